"""Frozen representation encoders for the FAE: images (B, H, W, 3), normalised -> patch features
(B, h, w, C).

- `DinoV2`: the DINOv2 ViT (patch 14, CLS and optional register tokens, learned position
  embeddings resampled for other input sizes, layer scale, GELU MLP or SwiGLU feed-forward,
  pre-norm LayerNorm blocks scanned over depth, final LayerNorm), matching `transformers`'
  `Dinov2Model` / `Dinov2WithRegistersModel`. Weights: `pretzel_jax.convert.hf_dinov2.load`.
- `QwenVisionEncoder`: a Qwen2.5-VL vision tower's per-patch features before its 2x2 merger
  (the toy-scale encoder, with the stage-0 VLM's tower).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.nn import MLP, Attention, Dense, LayerNorm
from pretzel_jax.nn.sharding import constrain, param
from pretzel_jax.nn.transformer import REMAT_POLICIES

# config.json keys with no effect on a frozen encoder's forward pass: training-only (dropout,
# drop path, init), the initial layer-scale value (the weights hold the trained one), backbone
# and classification-head options, and metadata.
IGNORED_HF_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "drop_path_rate",
        "initializer_range",
        "layerscale_value",
        "apply_layernorm",
        "reshape_hidden_states",
        "out_features",
        "out_indices",
        "_out_features",
        "_out_indices",
        "stage_names",
        "id2label",
        "label2id",
    }
)
# transformers' activation names -> our MLP kinds.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """DINOv2 sizes; the defaults are DINOv2-g/14 (facebook/dinov2-giant)."""

    hidden_size: int = 1536
    num_layers: int = 40
    num_heads: int = 24
    mlp_ratio: float = 4
    use_swiglu_ffn: bool = True
    hidden_act: str = "gelu"
    patch_size: int = 14
    image_size: int = 518  # pretraining size: the position table is (image_size/patch)**2 + 1
    num_channels: int = 3
    num_register_tokens: int = 0
    use_mask_token: bool = True
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    # Dinov2WithRegisters resamples positions with antialias=True (which also changes the cubic
    # kernel, see resize_matrix); plain Dinov2 without.
    interpolate_antialias: bool = False
    remat: str = "none"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DinoV2Config.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        if self.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(
                f"DinoV2Config.hidden_act {self.hidden_act!r} is not supported; use one of "
                f"{sorted(HF_ACTIVATIONS)}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"DinoV2Config.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"DinoV2Config.remat {self.remat!r} unknown; use one of {list(REMAT_POLICIES)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Side of the pretrained position grid, in patches."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # transformers keeps 2/3 of it, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> DinoV2Config:
        """A Hugging Face Dinov2 / Dinov2WithRegisters config.json dict -> DinoV2Config.
        `overrides` set our own fields (param_dtype, compute_dtype, remat). A key we do not know
        or a value we do not implement raises ValueError naming it."""
        model_type = hf.get("model_type", "dinov2")
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(
                f"config.json model_type {model_type!r} is not a DINOv2 model "
                "('dinov2' or 'dinov2_with_registers')"
            )
        fields = {
            "hidden_size": "hidden_size",
            "num_hidden_layers": "num_layers",
            "num_attention_heads": "num_heads",
            "mlp_ratio": "mlp_ratio",
            "use_swiglu_ffn": "use_swiglu_ffn",
            "hidden_act": "hidden_act",
            "patch_size": "patch_size",
            "image_size": "image_size",
            "num_channels": "num_channels",
            "num_register_tokens": "num_register_tokens",
            "use_mask_token": "use_mask_token",
            "qkv_bias": "qkv_bias",
            "layer_norm_eps": "layer_norm_eps",
        }
        unknown = sorted(set(hf) - set(fields) - IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(
                f"config.json field(s) {unknown} are not supported by DinoV2Config; remove them "
                "if they do not change the architecture"
            )
        kw = {}
        for key, ours in fields.items():
            if key not in hf:
                continue
            value = hf[key]
            if key in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(
                        f"config.json {key} {value} is not square; only square images and "
                        "patches are supported"
                    )
                value = value[0]
            kw[ours] = value
        if model_type == "dinov2_with_registers":
            kw["interpolate_antialias"] = True
            kw["use_mask_token"] = True  # those checkpoints always carry the mask token
        elif kw.get("num_register_tokens", 0):
            raise ValueError(
                f"config.json num_register_tokens {kw['num_register_tokens']} with model_type "
                "'dinov2', which has no register tokens: use model_type 'dinov2_with_registers'"
            )
        if kw.get("hidden_act", "gelu") not in HF_ACTIVATIONS:
            raise ValueError(
                f"config.json hidden_act {kw['hidden_act']!r} is not supported; use one of "
                f"{sorted(HF_ACTIVATIONS)}"
            )
        return cls(**{**kw, **overrides})


# -- position-embedding resampling -----------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (torch: -0.75; PIL / antialias: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """(size_out, size_in) weights of torch's 1-D bicubic resize with align_corners=False, so
    that a separable 2-D `F.interpolate(..., mode="bicubic")` is R_h @ X @ R_w.T.

    Without antialias (upsample_bicubic2d): source x = (i + 0.5) * in/out - 0.5, taps
    floor(x) - 1 .. floor(x) + 2 clamped to the border, a = -0.75. With antialias (torch's
    PIL-style `_upsample_bicubic2d_aa`): a = -0.5, support 2 * max(in/out, 1), the kernel
    stretched by in/out when downsampling, taps outside the input dropped and the weights
    renormalised."""
    scale = size_in / size_out
    m = np.zeros((size_out, size_in))
    for i in range(size_out):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            inv = 1.0 / scale if scale >= 1.0 else 1.0
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), size_in)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) * inv, -0.5)
            if w.sum() != 0:
                w = w / w.sum()
            np.add.at(m[i], taps, w)
        else:
            x = (i + 0.5) * scale - 0.5
            base = min(math.floor(x), size_in - 1)
            t = min(max(x - base, 0.0), 1.0)
            w = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
            taps = np.clip(base - 1 + np.arange(4), 0, size_in - 1)
            np.add.at(m[i], taps, w)
    return m.astype(np.float32)


def resize_positions(pos: jax.Array, out_hw: tuple[int, int], antialias: bool) -> jax.Array:
    """pos (g, g, C) -> (h, w, C) by torch's bicubic resize, in float32."""
    g = pos.shape[0]
    rh = jnp.asarray(resize_matrix(g, out_hw[0], antialias))
    rw = jnp.asarray(resize_matrix(g, out_hw[1], antialias))
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("hi,wj,ijc->hwc", rh, rw, pos.astype(jnp.float32), precision=hp)


# -- DINOv2 ------------------------------------------------------------------------------------


class DinoBlock(nnx.Module):
    """x + ls1 * attn(norm1(x)), then x + ls2 * ffn(norm2(x)); bidirectional attention."""

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        kw = dict(
            param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype)
        )
        d = cfg.hidden_size
        self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(
            d, cfg.num_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias, out_bias=True, rngs=rngs, **kw
        )
        self.layer_scale1 = param(jnp.ones((d,), kw["param_dtype"]), ("embed",))
        self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps)
        kind = "swiglu" if cfg.use_swiglu_ffn else HF_ACTIVATIONS[cfg.hidden_act]
        self.mlp = MLP(d, cfg.mlp_hidden, kind=kind, use_bias=True, rngs=rngs, **kw)
        self.layer_scale2 = param(jnp.ones((d,), kw["param_dtype"]), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h, _ = self.attn(self.norm1(x), causal=False)
        x = x + (h * self.layer_scale1[...].astype(h.dtype)).astype(x.dtype)
        h = self.mlp(self.norm2(x))
        x = x + (h * self.layer_scale2[...].astype(h.dtype)).astype(x.dtype)
        return constrain(x, ("batch", "length", "embed"))


class DinoV2(nnx.Module):
    """DINOv2 ViT. The patch conv (stride = kernel = patch) is a Dense over flattened
    (P, P, C) patches; `blocks` are stacked on a leading `layers` axis and run with `lax.scan`."""

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pdt = cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        self.patch_embed = Dense(
            cfg.patch_size**2 * cfg.num_channels,
            d,
            axes=(None, "embed"),
            rngs=rngs,
            param_dtype=pdt,
            compute_dtype=jnp.dtype(cfg.compute_dtype),
        )
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = param(init(rngs.params(), (d,), pdt), ("embed",))
        # Used only to replace masked patches (`mask` of __call__), as in DINOv2 pretraining.
        self.mask_token = param(jnp.zeros((d,), pdt), ("embed",)) if cfg.use_mask_token else None
        self.register_tokens = (
            param(jnp.zeros((cfg.num_register_tokens, d), pdt), (None, "embed"))
            if cfg.num_register_tokens
            else None
        )
        self.position_embeddings = param(
            init(rngs.params(), (cfg.grid**2 + 1, d), pdt), (None, "embed")
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return DinoBlock(cfg, rngs=rngs)

        self.blocks = make(rngs)
        self.layernorm = LayerNorm(d, eps=cfg.layer_norm_eps)

    def positions(self, h: int, w: int) -> jax.Array:
        """(1 + h*w, C) position embeddings for an h x w patch grid: the table itself at the
        pretraining size, else its patch part resampled as transformers does."""
        pos = self.position_embeddings[...]
        g = self.cfg.grid
        if (h, w) == (g, g):
            return pos
        grid = pos[1:].reshape(g, g, -1)
        patches = resize_positions(grid, (h, w), self.cfg.interpolate_antialias)
        return jnp.concatenate([pos[:1], patches.reshape(h * w, -1).astype(pos.dtype)])

    def __call__(self, pixel_values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """pixel_values (B, H, W, C), H and W multiples of the patch size; `mask` (B, h, w) bool
        replaces those patches by the mask token -> last hidden state (B, 1 + R + h*w, hidden):
        CLS, R register tokens, patches in raster order (transformers' `last_hidden_state`)."""
        cfg = self.cfg
        b, hh, ww, c = pixel_values.shape
        p = cfg.patch_size
        if c != cfg.num_channels or hh % p or ww % p:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; DINOv2 needs (B, H, W, "
                f"{cfg.num_channels}) with H and W multiples of the patch size {p}: resize or "
                "crop the images"
            )
        h, w = hh // p, ww // p
        patches = pixel_values.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(patches.reshape(b, h * w, p * p * c))
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this DINOv2 has no mask token (use_mask_token=False)")
            m = mask.reshape(b, h * w, 1)
            x = jnp.where(m, self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], 1) + self.positions(h, w).astype(x.dtype)
        if self.register_tokens is not None:
            reg = self.register_tokens[...].astype(x.dtype)
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, *reg.shape)), x[:, 1:]], 1)
        x = constrain(x, ("batch", "length", "embed"))

        graphdef, state = nnx.split(self.blocks)

        def body(h, block_state):
            return nnx.merge(graphdef, block_state)(h), None

        policy = REMAT_POLICIES[cfg.remat]
        if policy is not None:
            body = jax.checkpoint(body, policy=policy)
        x, _ = jax.lax.scan(body, x, state)
        return self.layernorm(x)

    def encode(
        self, pixel_values: jax.Array, *, mask: jax.Array | None = None, return_cls: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """pixel_values (B, H, W, C) normalised -> patch features (B, H/14, W/14, hidden), and
        the CLS feature (B, hidden) too with `return_cls`. Register tokens are dropped; `mask`
        as in __call__."""
        b, hh, ww, _ = pixel_values.shape
        p = self.cfg.patch_size
        out = self(pixel_values, mask=mask)
        feats = out[:, 1 + self.cfg.num_register_tokens :].reshape(b, hh // p, ww // p, -1)
        return (feats, out[:, 0]) if return_cls else feats

    @property
    def feature_dim(self) -> int:
        return self.cfg.hidden_size


# -- Qwen2.5-VL vision tower -------------------------------------------------------------------


class QwenVisionEncoder(nnx.Module):
    """A Qwen2.5-VL vision tower (`pretzel_jax.vlm.VisionTower`, passed in so that `fae` need not
    import `vlm`) as a representation encoder: its last block's per-patch features, before the
    2x2 patch merger, as a (B, h, w, hidden) grid. (`pretzel_jax.models.fae` may pass a tower cut
    to its first blocks: `model.fae.encoder.layers`.)"""

    def __init__(self, tower):
        self.tower = tower

    @property
    def feature_dim(self) -> int:
        return self.tower.cfg.hidden_size

    def encode(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, H, W, 3) normalised as the tower expects (CLIP mean/std), H and W
        multiples of patch_size * spatial_merge_size -> (B, H/P, W/P, hidden)."""
        cfg = self.tower.cfg
        b, hh, ww, c = pixel_values.shape
        p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
        if c != cfg.in_channels or hh % (p * m) or ww % (p * m):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; the Qwen vision tower "
                f"needs (B, H, W, {cfg.in_channels}) with H and W multiples of patch_size * "
                f"spatial_merge_size = {p * m}: resize or crop the images"
            )
        bh, bw = hh // (p * m), ww // (p * m)
        # The processor's patch order (vlm.image_processing.patchify): merge blocks in raster
        # order, the m x m patches of a block consecutive, each patch flattened (C, T, P, P)
        # with the still image repeated over the T frames.
        x = pixel_values.reshape(b, bh, m, p, bw, m, p, c).transpose(0, 1, 4, 2, 5, 7, 3, 6)
        x = jnp.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], t, p, p))
        n = bh * bw * m * m
        grid = ((1, bh * m, bw * m),)
        # One image at a time under vmap (the tower packs images into one token axis): the
        # window permutations then keep a batch axis a mesh can shard (packed, every device
        # ran the whole batch's tower).
        feats = jax.vmap(lambda one: self.tower.features(one, grid))(x.reshape(b, n, c * t * p * p))
        feats = feats.reshape(b, bh, bw, m, m, -1).transpose(0, 1, 3, 2, 4, 5)
        return feats.reshape(b, bh * m, bw * m, -1)
