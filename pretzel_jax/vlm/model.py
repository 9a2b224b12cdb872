"""Qwen2.5-VL (or plain Qwen2 when `cfg.vision` is None): vision tower + text decoder.

Two levels of API:
- `model(input_ids, pixel_values, image_grid_thw, attention_mask) -> logits`, the host-side
  forward that matches transformers' `Qwen2_5_VLForConditionalGeneration` on the same inputs: it
  needs concrete (not traced) ids because M-RoPE positions come from `rope_index` (numpy), then
  runs one jitted function (compiled once per shape and grid set).
- `embed`, `forward`, `logits`, `init_cache`: pure pieces for jitted pipelines (generation, the
  Pretzel model) that compute positions themselves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.nn import KVCache
from pretzel_jax.vlm.config import VLMConfig
from pretzel_jax.vlm.rope_index import rope_index
from pretzel_jax.vlm.text import TextDecoder
from pretzel_jax.vlm.vision import VisionTower, normalize_grid


class Qwen25VL(nnx.Module):
    def __init__(self, cfg: VLMConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.text = TextDecoder(cfg.text, rngs)
        self.vision = None if cfg.vision is None else VisionTower(cfg.vision, rngs=rngs)

    def _check_images(self, input_ids, pixel_values, image_grid_thw):
        """Host-side checks (skipped under tracing: then a count mismatch is the caller's bug)."""
        if pixel_values is not None and self.vision is None:
            raise ValueError("pixel_values given, but this model has no vision tower (Qwen2)")
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw (one (t, h, w) per image)")
        if isinstance(input_ids, jax.core.Tracer):
            return
        n_tokens = int(np.sum(np.asarray(input_ids) == self.cfg.image_token_id))
        n_feats = 0
        if pixel_values is not None:
            m = self.cfg.vision.spatial_merge_size
            grid = normalize_grid(image_grid_thw, m)
            n_feats = sum(t * h * w for t, h, w in grid) // (m * m)
        if n_tokens != n_feats:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (id {self.cfg.image_token_id}) but the "
                f"images give {n_feats} features (image_grid_thw {image_grid_thw!r}); expand each "
                "image placeholder to t*h*w/merge**2 tokens (the tokenizer's chat template does)"
            )

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Token embeddings (B, L, D) with the vision tower's merged patch features written, in
        order over the flattened batch, at the positions whose id is image_token_id."""
        self._check_images(input_ids, pixel_values, image_grid_thw)
        ids = jnp.asarray(input_ids)
        x = self.text.embed_tokens(ids)
        if pixel_values is None:
            return x
        feats = self.vision(jnp.asarray(pixel_values), image_grid_thw).astype(x.dtype)
        b, length, d = x.shape
        is_img = (ids == self.cfg.image_token_id).reshape(-1)
        # k-th image token (row-major over the batch) takes feature k.
        k = jnp.clip(jnp.cumsum(is_img) - 1, 0, feats.shape[0] - 1)
        out = jnp.where(is_img[:, None], feats[k], x.reshape(-1, d))
        return out.reshape(b, length, d)

    def forward(
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
        return self.text(
            embeds,
            positions,
            kv_mask=kv_mask,
            cache=cache,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
            return_layers=return_layers,
            layers=layers,
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.text.logits(hidden)

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        return self.text.init_cache(batch, size, dtype)

    def positions(self, input_ids, image_grid_thw=None, attention_mask=None):
        """M-RoPE positions (B, L, 3) and decode deltas (B,) for concrete ids (numpy)."""
        merge = 1 if self.cfg.vision is None else self.cfg.vision.spatial_merge_size
        return rope_index(
            np.asarray(input_ids),
            None if image_grid_thw is None else np.asarray(image_grid_thw),
            None if attention_mask is None else np.asarray(attention_mask),
            spatial_merge_size=merge,
            image_token_id=self.cfg.image_token_id,
            vision_start_token_id=None if self.vision is None else self.cfg.vision_start_token_id,
        )

    def __call__(
        self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None
    ) -> jax.Array:
        """-> logits (B, L, vocab) float32; attention_mask (B, L) 1 = real token, 0 = padding."""
        self._check_images(input_ids, pixel_values, image_grid_thw)
        positions, _ = self.positions(input_ids, image_grid_thw, attention_mask)
        grid = None
        if pixel_values is not None:
            grid = normalize_grid(image_grid_thw, self.cfg.vision.spatial_merge_size)
        graphdef, state = nnx.split(self)
        return _forward_logits(
            graphdef,
            state,
            jnp.asarray(input_ids),
            None if pixel_values is None else jnp.asarray(pixel_values),
            grid,
            jnp.asarray(positions, jnp.int32),
            None if attention_mask is None else jnp.asarray(attention_mask) != 0,
        )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward_logits(graphdef, state, ids, pixel_values, grid, positions, kv_mask):
    model = nnx.merge(graphdef, state)
    embeds = model.embed(ids, pixel_values, grid)
    hidden, _ = model.forward(embeds, positions, kv_mask=kv_mask)
    return model.logits(hidden)
