"""Fused causal-flow affine step: the head of one autoregressive-flow block, as Pallas kernels.

    o = h @ W + b; o = c tanh(o / c) (soft_clip c > 0); a, mu = split(o)
    sigma = softplus(a + log(e - 1)) or exp(a); z = (x - mu) / sigma
    -> z, sum m log sigma, sum m z^2   (m: optional (B, N) position mask; sums per row or per
                                        position)

Split by concern (as AXLearn's `flash_attention/`):

- `reference`: pure-jnp references and the math they share with the kernels.
- `support`: `is_supported` (what each backend requires), platform targets, block sizes, the
  TPU VMEM estimate, fallback logging.
- `common`: kernel plumbing shared by both bodies (tile math, operand layout, pallas_call).
- `tpu`: Mosaic kernel bodies and builders (they also run in interpret mode on CPU).
- `gpu`: Triton kernel bodies and builders.
- `ops`: the public ops, `affine_forward` (custom_vjp, shard_map over the batch) and
  `guided_sample_step`.
- `testing`: test hooks (force a body in interpret mode, NaN-poison outputs); production code
  never imports it.
"""

from pretzel_jax.kernels.flow_affine.ops import (
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
