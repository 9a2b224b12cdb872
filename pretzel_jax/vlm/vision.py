"""Qwen2.5-VL vision tower: patches -> ViT with 2-D RoPE and window attention -> 2x2 merger.

Patches arrive in the processor's order: per image, per frame, merge blocks (m x m patches) in
raster order and the m*m patches of a block consecutive. The tower first permutes whole merge
blocks into *window order* (frame, window row, window column, block inside the window), so that
every attention window is a contiguous run, runs all blocks there, merges each block's m*m
patches into one token, and permutes the merged tokens back to processor order.

HF runs attention as variable-length segments (`cu_seqlens`): one per frame in the
`fullatt_block_indexes` layers, one per window in the others. Here the segments are gathered into
a padded batch (segments x longest segment) and attended with a key-padding mask, so a window
layer costs N x window tokens rather than N**2; a scanned boolean picks the grouping per layer
(`lax.cond`). The layout depends only on the static `grid_thw`, so it is computed on the host and
baked into the trace (one compile per grid set).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.nn import (
    MLP,
    Dense,
    RMSNorm,
    apply_rope,
    dot_product_attention,
    gelu,
    make_mask,
)
from pretzel_jax.nn.rope import rope_1d, rope_angles
from pretzel_jax.nn.sharding import constrain, param

# HF's vision rotary table uses theta 10000 (the vision config's `rope_parameters`).
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower sizes; defaults are the 7B checkpoint's."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rms_norm_eps: float = 1e-6
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    unroll_layers: bool = False  # see nn.TransformerConfig

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"VisionConfig head_dim ({self.head_dim}) must be a multiple of 4 for the 2-D "
                "rotary embedding (half the pairs per axis)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"VisionConfig.fullatt_block_indexes {bad} out of range for depth {self.depth}"
            )
        if self.merge_window < 1:
            raise ValueError(
                f"VisionConfig.window_size ({self.window_size}) must be at least "
                f"patch_size * spatial_merge_size ({self.patch_size * self.spatial_merge_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_window(self) -> int:
        """Window side in merge blocks, floored as HF does."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (C, T, P, P) patch in pixel_values."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


Grid = tuple[tuple[int, int, int], ...]


def normalize_grid(grid_thw, merge: int) -> Grid:
    """grid_thw as a tuple of (t, h, w) python ints, checked; it must be static (not traced)."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError(
            "grid_thw must be static (python ints or a numpy array), not a traced array: pass it "
            "as a static argument of jit"
        )
    rows = np.asarray(grid_thw).tolist()
    if not rows or any(not isinstance(r, list) or len(r) != 3 for r in rows):
        raise ValueError(f"grid_thw must be a non-empty list of (t, h, w) rows, got {grid_thw!r}")
    grid = tuple((int(t), int(h), int(w)) for t, h, w in rows)
    for i, (t, h, w) in enumerate(grid):
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(
                f"grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of "
                f"spatial_merge_size ({merge})"
            )
    return grid


@dataclasses.dataclass(frozen=True)
class Groups:
    """Contiguous attention segments of the window-ordered sequence laid out as a padded batch:
    index (G, L) token of each slot (0 in padding), valid (G, L), inverse (N,) flat slot of each
    token. Attention then costs G * L**2 instead of N**2."""

    index: np.ndarray
    valid: np.ndarray
    inverse: np.ndarray

    @classmethod
    def from_segments(cls, seg: np.ndarray) -> Groups:
        counts = np.bincount(seg)
        length = int(counts.max())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(len(seg)) - starts[seg]
        index = np.zeros((len(counts), length), np.int32)
        valid = np.zeros((len(counts), length), bool)
        index[seg, pos] = np.arange(len(seg))
        valid[seg, pos] = True
        return cls(index, valid, (seg * length + pos).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """Host-side constants for one grid set. N patches, U = N / merge**2 merge blocks.

    patch_perm (N,): window-order patch j is processor-order patch patch_perm[j].
    unit_inverse (U,): processor-order merged token u is window-order token unit_inverse[u].
    positions (N, 2): (row, col) patch coordinates in window order (the rotary ids).
    frame_segments, window_segments (N,): attention segment ids in window order (each segment a
    contiguous run), and the same as padded `Groups`.
    """

    patch_perm: np.ndarray
    unit_inverse: np.ndarray
    positions: np.ndarray
    frame_segments: np.ndarray
    window_segments: np.ndarray

    @functools.cached_property
    def frames(self) -> Groups:
        return Groups.from_segments(self.frame_segments)

    @functools.cached_property
    def windows(self) -> Groups:
        return Groups.from_segments(self.window_segments)


@functools.lru_cache(maxsize=64)
def window_layout(grid: Grid, merge: int, merge_window: int) -> WindowLayout:
    unit = merge * merge
    win = merge_window
    window_index, window_ids, frame_ids, positions = [], [], [], []
    units_before = windows_before = frames_before = 0
    for t, h, w in grid:
        bh, bw = h // merge, w // merge
        # Block (f, i, j) sorts by (frame, window row, window col, row in window, col in window).
        f, i, j = np.meshgrid(np.arange(t), np.arange(bh), np.arange(bw), indexing="ij")
        nwh, nww = -(-bh // win), -(-bw // win)
        wid = (f * nwh + i // win) * nww + j // win
        order = np.lexsort(((j % win).ravel(), (i % win).ravel(), wid.ravel()))
        window_index.append(order + units_before)
        window_ids.append(wid.ravel()[order] + windows_before)
        frame_ids.append(f.ravel()[order] + frames_before)
        # Patch coordinates in processor order: (frame, block row, block col, mh, mw).
        rows = np.arange(h).reshape(bh, merge, 1, 1) * np.ones((1, 1, bw, merge), int)
        cols = np.arange(w).reshape(1, 1, bw, merge) * np.ones((bh, merge, 1, 1), int)
        hw = np.stack([rows.transpose(0, 2, 1, 3).ravel(), cols.transpose(0, 2, 1, 3).ravel()], -1)
        positions.append(np.tile(hw, (t, 1)))
        units_before += t * bh * bw
        windows_before += t * nwh * nww
        frames_before += t
    window_index = np.concatenate(window_index)
    patch_perm = (window_index[:, None] * unit + np.arange(unit)).ravel()
    return WindowLayout(
        patch_perm=patch_perm,
        unit_inverse=np.argsort(window_index),
        positions=np.concatenate(positions)[patch_perm].astype(np.int32),
        frame_segments=np.repeat(np.concatenate(frame_ids), unit).astype(np.int32),
        window_segments=np.repeat(np.concatenate(window_ids), unit).astype(np.int32),
    )


class FusedQKV(nnx.Module):
    """q, k, v from one matmul. Kernel (embed, 3, heads*head_dim): tensor parallelism splits the
    heads inside each of q, k and v rather than cutting across the q|k|v boundary."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype, compute_dtype):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.kernel = param(
            init(rngs.params(), (dim, 3, dim), param_dtype), ("embed", None, "heads")
        )
        self.bias = param(jnp.zeros((3, dim), param_dtype), (None, "heads"))
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., dim) -> (..., 3, dim)."""
        dt = self.compute_dtype
        y = jnp.einsum("...d,dkh->...kh", x.astype(dt), self.kernel[...].astype(dt))
        return y + self.bias[...].astype(dt)


def grouped_attention(q, k, v, groups: Groups, scale: float) -> jax.Array:
    """q, k, v (N, H, D) -> (N, H, D): full attention inside each group, none across."""
    slots = jnp.arange(groups.index.shape[1])
    mask = make_mask(slots, slots, causal=False, kv_mask=jnp.asarray(groups.valid))
    idx = jnp.asarray(groups.index)
    out = dot_product_attention(q[idx], k[idx], v[idx], mask, scale)
    return out.reshape(-1, *out.shape[2:])[jnp.asarray(groups.inverse)]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, **kw):
        self.qkv = FusedQKV(cfg.hidden_size, rngs=rngs, **kw)
        self.proj = Dense(
            cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), rngs=rngs, **kw
        )
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x: jax.Array, rope, layout: WindowLayout, full: jax.Array) -> jax.Array:
        """x (N, hidden); `full` (traced bool) picks per-frame over per-window attention."""
        n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(1, n, 3, self.heads, self.head_dim), 2, 0)
        q = apply_rope(q, *rope, interleaved=False)[0]
        k = apply_rope(k, *rope, interleaved=False)[0]
        scale = self.head_dim**-0.5
        out = jax.lax.cond(
            full,
            lambda: grouped_attention(q, k, v[0], layout.frames, scale),
            lambda: grouped_attention(q, k, v[0], layout.windows, scale),
        )
        return self.proj(out.reshape(n, d))


class VisionBlock(nnx.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); SwiGLU MLP with biases."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(
            param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype)
        )
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg, rngs=rngs, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(
            cfg.hidden_size, cfg.intermediate_size, kind="swiglu", use_bias=True, rngs=rngs, **kw
        )

    def __call__(self, x: jax.Array, rope, layout: WindowLayout, full: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), rope, layout, full).astype(x.dtype)
        x = x + self.mlp(self.norm2(x)).astype(x.dtype)
        return constrain(x, ("length", "embed"))


class PatchMerger(nnx.Module):
    """RMSNorm, then each merge block's m*m patch vectors concatenated -> Linear, GELU, Linear."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(
            rngs=rngs,
            param_dtype=jnp.dtype(cfg.param_dtype),
            compute_dtype=jnp.dtype(cfg.compute_dtype),
        )
        wide = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.fc1 = Dense(wide, wide, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(wide, cfg.out_hidden_size, axes=("mlp", "embed"), **kw)
        self.wide = wide

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.ln_q(x).reshape(-1, self.wide)
        return self.fc2(gelu(self.fc1(h)))


class VisionTower(nnx.Module):
    """Qwen2.5-VL vision transformer. `blocks` holds `depth` VisionBlocks stacked on a leading
    `layers` axis and run with `lax.scan`; whether a layer attends per frame or per window is a
    scanned boolean."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = Dense(
            cfg.patch_dim,
            cfg.hidden_size,
            axes=(None, "embed"),
            use_bias=False,
            rngs=rngs,
            param_dtype=jnp.dtype(cfg.param_dtype),
            compute_dtype=jnp.dtype(cfg.compute_dtype),
        )

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return VisionBlock(cfg, rngs=rngs)

        self.blocks = make(rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, grid_thw: Sequence[Sequence[int]]) -> jax.Array:
        """pixel_values (N, C*T*P*P) in processor order; grid_thw static (t, h, w) per image ->
        (N / merge**2, out_hidden_size), merged tokens in processor order."""
        x, lay = self._blocks(pixel_values, grid_thw)
        return self.merger(x)[lay.unit_inverse]

    def features(self, pixel_values: jax.Array, grid_thw: Sequence[Sequence[int]]) -> jax.Array:
        """The last block's output before the patch merger (and its norm): (N, hidden_size), one
        row per patch in processor order (the order of `pixel_values`)."""
        x, lay = self._blocks(pixel_values, grid_thw)
        return x[np.argsort(lay.patch_perm)]

    def _blocks(self, pixel_values: jax.Array, grid_thw) -> tuple[jax.Array, WindowLayout]:
        """Patch embedding and every block: (N, hidden_size) in window order, and the layout."""
        cfg = self.cfg
        grid = normalize_grid(grid_thw, cfg.spatial_merge_size)
        n = sum(t * h * w for t, h, w in grid)
        if pixel_values.ndim != 2 or pixel_values.shape != (n, cfg.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid} needs "
                f"({n}, {cfg.patch_dim}) (patches, in_channels * temporal_patch_size * "
                "patch_size**2)"
            )
        lay = window_layout(grid, cfg.spatial_merge_size, cfg.merge_window)

        x = self.patch_embed(pixel_values[lay.patch_perm])  # (N, hidden), window order
        freqs, _ = rope_1d(cfg.head_dim // 2, ROPE_THETA)
        # Half-split pairs: the first head_dim/4 rotate with the patch row, the rest with the
        # column, both with the same frequencies (HF's cat([f_h, f_w]) layout).
        axis_of_pair = np.repeat(np.arange(2, dtype=np.int32), cfg.head_dim // 4)
        rope = rope_angles(jnp.asarray(lay.positions)[None], np.tile(freqs, 2), axis_of_pair)
        graphdef, state = nnx.split(self.blocks)

        def body(h, xs):
            block_state, full = xs
            return nnx.merge(graphdef, block_state)(h, rope, lay, full), None

        is_full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
        x, _ = jax.lax.scan(body, x, (state, jnp.asarray(is_full)), unroll=cfg.unroll_layers)
        return x, lay
