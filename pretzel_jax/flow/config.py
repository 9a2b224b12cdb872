"""FlowConfig: the STARFlow knobs of a deep-shallow autoregressive flow."""

from __future__ import annotations

import dataclasses

from pretzel_jax.kernels.flow_affine import IMPLS as AFFINE_IMPLS
from pretzel_jax.nn import TransformerConfig

PERMUTATIONS = ("identity", "flip")
ROPE_KINDS = ("none", "1d", "sectioned")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    token_dim: int  # D: dimension of one latent/patch token
    width: int = 128
    head_dim: int = 64
    kv_heads: int | None = None  # grouped-query attention; None = one KV head per head
    # Layers of each AF block in data->noise order; the LAST entry is the deep block, the others
    # are shallow blocks (STARFlow: [2, 2, 2, 2, 2, 24]; STARFlow2: [4, 4, 24]).
    layers_per_block: tuple[int, ...] = (2, 2, 4)
    mlp_ratio: float = 4.0
    use_sos: bool = True  # STARFlow's learned start token; False = TarFlow's output shift
    use_softplus: bool = True  # sigma = softplus(a + 0.5413); False = exp(a)
    soft_clip: float = 4.0  # head output o -> c*tanh(o/c); 0 disables
    use_final_norm: bool = True  # unit-offset RMSNorm before the head
    context_dim: int = 0  # >0: the deep block takes a context prefix of this feature size
    # One entry per block; default: deep block identity (raster order shared with text), the
    # shallow blocks alternate so the one next to the deep block is flipped.
    permutations: tuple[str, ...] | None = None
    norm: str = "layer_norm"
    norm_eps: float = 1e-5
    mlp_kind: str = "gelu"
    rope: str = "1d"  # "sectioned" needs positions (B, L, len(rope_sections)) from the caller
    rope_sections: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    rope_interleaved: bool = True
    remat: str = "none"
    unroll_layers: bool = False  # see TransformerConfig (faster shallow stacks on CPU)
    # The fused head (matmul, clip, scale, z, log-det) and the guided sampling mix: "xla" (plain
    # jnp) or "pallas" (pretzel_jax.kernels.flow_affine; falls back to xla, logged, where the
    # kernel does not support the shapes or platform).
    affine_impl: str = "xla"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "layers_per_block", tuple(self.layers_per_block))
        object.__setattr__(self, "rope_sections", tuple(self.rope_sections))
        if self.permutations is not None:
            object.__setattr__(self, "permutations", tuple(self.permutations))
        _check(self.token_dim > 0, "token_dim", "must be positive")
        _check(len(self.layers_per_block) >= 1, "layers_per_block", "needs at least the deep block")
        _check(
            all(n >= 1 for n in self.layers_per_block), "layers_per_block", "entries must be >= 1"
        )
        _check(
            self.width % self.head_dim == 0,
            "width",
            f"must be a multiple of head_dim ({self.head_dim})",
        )
        _check(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE pairs)")
        _check(self.rope in ROPE_KINDS, "rope", f"must be one of {ROPE_KINDS}")
        _check(self.affine_impl in AFFINE_IMPLS, "affine_impl", f"must be one of {AFFINE_IMPLS}")
        if self.rope == "sectioned":
            _check(
                sum(self.rope_sections) == self.head_dim // 2,
                "rope_sections",
                f"must sum to head_dim/2 = {self.head_dim // 2}",
            )
        perms = self.block_permutations
        _check(len(perms) == self.num_blocks, "permutations", "needs one entry per block")
        _check(
            all(p in PERMUTATIONS for p in perms),
            "permutations",
            f"entries must be in {PERMUTATIONS}",
        )
        _ = self.transformer  # validates the norm / mlp / remat names

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def block_permutations(self) -> tuple[str, ...]:
        if self.permutations is not None:
            return self.permutations
        n = self.num_blocks
        return tuple("identity" if (n - 1 - i) % 2 == 0 else "flip" for i in range(n))

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            dim=self.width,
            heads=self.width // self.head_dim,
            head_dim=self.head_dim,
            kv_heads=self.kv_heads,
            mlp_hidden=int(self.width * self.mlp_ratio),
            mlp_kind=self.mlp_kind,
            norm=self.norm,
            norm_eps=self.norm_eps,
            rope_interleaved=self.rope_interleaved,
            remat=self.remat,
            unroll_layers=self.unroll_layers,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
        )


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"FlowConfig.{key} {why}")
