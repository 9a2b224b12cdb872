"""The autoregressive normalizing-flow stream (TarFlow / STARFlow deep-shallow)."""

from pretzel_jax.flow.block import AFBlock
from pretzel_jax.flow.config import FlowConfig
from pretzel_jax.flow.guidance import additive, gaussian_product
from pretzel_jax.flow.jacobi import (
    FlowJacobiStats,
    JacobiStats,
    jacobi_flow_inverse,
    jacobi_inverse,
)
from pretzel_jax.flow.likelihood import bits_per_dim, latent_norm_penalty, nll_per_dim
from pretzel_jax.flow.noise import gaussian_augment, tweedie_denoise, uniform_dequantize
from pretzel_jax.flow.stack import DeepShallowFlow, FlowOutput

__all__ = [
    "AFBlock",
    "DeepShallowFlow",
    "FlowConfig",
    "FlowJacobiStats",
    "FlowOutput",
    "JacobiStats",
    "additive",
    "bits_per_dim",
    "gaussian_augment",
    "gaussian_product",
    "jacobi_flow_inverse",
    "jacobi_inverse",
    "latent_norm_penalty",
    "nll_per_dim",
    "tweedie_denoise",
    "uniform_dequantize",
]
