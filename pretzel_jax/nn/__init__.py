"""Model-agnostic building blocks: attention + KV cache, RoPE, norms, MLPs, stacked layers,
logical-axis sharding helpers."""

from pretzel_jax.nn.attention import (
    Attention,
    KVCache,
    dot_product_attention,
    make_mask,
    packed_mask,
)
from pretzel_jax.nn.layers import MLP, Dense, LayerNorm, RMSNorm, gelu, make_norm
from pretzel_jax.nn.rope import apply_rope, rope_1d, rope_angles, rope_mrope, rope_sectioned
from pretzel_jax.nn.transformer import (
    REMAT_POLICIES,
    LayerStack,
    TransformerConfig,
    TransformerLayer,
)

__all__ = [
    "REMAT_POLICIES",
    "MLP",
    "Attention",
    "Dense",
    "KVCache",
    "LayerNorm",
    "LayerStack",
    "RMSNorm",
    "TransformerConfig",
    "TransformerLayer",
    "gelu",
    "apply_rope",
    "dot_product_attention",
    "make_mask",
    "make_norm",
    "packed_mask",
    "rope_1d",
    "rope_angles",
    "rope_mrope",
    "rope_sectioned",
]
