"""Pallas kernels with pure-jnp references (model-agnostic: imports jax/numpy/chex/logging only)."""

from pretzel_jax.kernels.flow_affine import (
    IMPLS,
    SOFTPLUS_ONE,
    affine_forward,
    affine_forward_reference,
    guided_sample_step,
    guided_sample_step_reference,
    is_supported,
)

__all__ = [
    "IMPLS",
    "SOFTPLUS_ONE",
    "affine_forward",
    "affine_forward_reference",
    "guided_sample_step",
    "guided_sample_step_reference",
    "is_supported",
]
