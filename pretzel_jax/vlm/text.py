"""Qwen2 / Qwen2.5-VL text decoder: token embedding, scanned pre-norm layers (GQA with q/k/v biases,
SwiGLU MLP, RMSNorm), half-split M-RoPE over (t, h, w) position ids, final RMSNorm, LM head.

Plain Qwen2 uses 1-D positions; M-RoPE with the same position on all three axes is exactly 1-D
RoPE (every pair sees the same angle), so one decoder serves both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.nn import (
    Dense,
    KVCache,
    LayerStack,
    RMSNorm,
    TransformerConfig,
    packed_mask,
    rope_angles,
    rope_mrope,
)
from pretzel_jax.nn.sharding import constrain, param


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    unroll_layers: bool = False  # see TransformerConfig

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TextConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TextConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"TextConfig.mrope_section {self.mrope_section} must sum to head_dim/2 = "
                f"{self.head_dim // 2}"
            )
        for name in ("param_dtype", "compute_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"TextConfig.{name}={getattr(self, name)!r} is no dtype") from e

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_config(self) -> TransformerConfig:
        return TransformerConfig(
            dim=self.hidden_size,
            heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_hidden=self.intermediate_size,
            kv_heads=self.num_kv_heads,
            mlp_kind="swiglu",
            norm="rms_norm",
            norm_eps=self.rms_norm_eps,
            qkv_bias=True,
            out_bias=False,
            mlp_bias=False,
            rope_interleaved=False,
            remat=self.remat,
            unroll_layers=self.unroll_layers,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
        )


class TextDecoder(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)  # HF initializer_range
        self.embed = param(
            init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt), ("vocab", "embed")
        )
        self.layers = LayerStack(cfg.layer_config(), cfg.num_layers, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                use_bias=False,
                kernel_init=init,
                rngs=rngs,
                param_dtype=pdt,
                compute_dtype=jnp.dtype(cfg.compute_dtype),
            )
        )

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """ids (B, L) int -> (B, L, D) in the parameter dtype."""
        return constrain(jnp.take(self.embed[...], ids, axis=0), ("batch", "length", "embed"))

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        """A KV cache for every layer (stacked on axis 0), `size` slots per example."""
        return self.layers.init_cache(batch, size, dtype)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        *,
        kv_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
        return_layers: bool = False,
        layers: tuple | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """embeds (B, L, D); positions (B, L, 3) [t, h, w] (or (B, L): the same on all axes);
        kv_mask (B, L) marks real (non-pad) tokens. With a cache the L tokens are written at
        cache.index and attend to everything cached before them. `segment_ids` (B, L), packed
        training only (no cache): a token attends only inside its own document (same id), and
        with `branch_ids` (B, L) (the layout's) only to branch 0 and its own branch.
        -> (final-normed hidden, cache); with `return_layers` also every layer's output
        (num_layers, B, L, D), before the final norm (the Pretzel's `vlm_taps`). `layers`: see
        `LayerStack.__call__` (decode loops)."""
        cfg = self.cfg
        if positions.ndim == 2:
            positions = jnp.repeat(positions[..., None], 3, axis=-1)
        if positions.shape != (*embeds.shape[:2], 3):
            raise ValueError(
                f"positions {positions.shape} must be (batch, length, 3) = "
                f"{(*embeds.shape[:2], 3)} to match embeds {embeds.shape}"
            )
        rope = rope_angles(positions, *rope_mrope(cfg.head_dim, cfg.mrope_section, cfg.rope_theta))
        x = constrain(embeds, ("batch", "length", "embed"))
        mask = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids are for packed training; decode without them")
            mask = packed_mask(segment_ids, branch_ids, kv_mask)
        out = self.layers(
            x,
            rope=rope,
            mask=mask,
            kv_mask=kv_mask,
            cache=cache,
            collect=return_layers,
            layers=layers,
        )
        return (self.norm(out[0]), *out[1:])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(B, L, D) -> (B, L, vocab) float32 (tied: hidden @ embed^T)."""
        if self.lm_head is not None:
            out = self.lm_head(hidden)
        else:
            cd = jnp.dtype(self.cfg.compute_dtype)
            out = jnp.einsum("bld,vd->blv", hidden.astype(cd), self.embed[...].astype(cd))
        return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))
