"""Next-token loss of a Qwen25VL over packed sequences (stage 0: the toy VLM trained from scratch).

A packed batch holds several documents per row (`segment_ids`), each with its own M-RoPE
positions restarting at 0, and a fixed number of image slots per row (`images`, `image_mask`).
Images are turned into Qwen's patches inside the jitted loss, exactly as
`vlm.preprocess_images` does for an image already at a multiple of patch * merge pixels (its
resize is then a no-op): rescale to [0, 1], CLIP-normalise, cut into (C, T, P, P) patches with
the frame repeated T times. Every slot (unused ones too) runs through the vision tower, so shapes
stay static; the k-th `<|image_pad|>` of a row takes merged token k % L of image k // L of that
row (L tokens per image), which is how the layout orders them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pretzel_jax.vlm.image_processing import CLIP_MEAN, CLIP_STD
from pretzel_jax.vlm.model import Qwen25VL
from pretzel_jax.vlm.vision import VisionConfig


def patchify(images: jax.Array, cfg: VisionConfig) -> jax.Array:
    """uint8 (N, H, W, C) -> float32 (N * H/P * W/P, C*T*P*P) patches in the processor's order
    (per image: merge blocks in raster order, the m*m patches of a block consecutive)."""
    n, h, w, c = images.shape
    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(
            f"images of {h}x{w} pixels: height and width must be multiples of patch_size * "
            f"spatial_merge_size = {p * m} (resize them first)"
        )
    x = images.astype(jnp.float32) * (1 / 255)
    x = (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
    x = x.reshape(n, h // (p * m), m, p, w // (p * m), m, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # (n, bh, bw, mh, mw, C, ph, pw)
    x = jnp.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], t, p, p))
    return x.reshape(n * (h // p) * (w // p), c * t * p * p)


def packed_embeds(model: Qwen25VL, tokens: jax.Array, images: jax.Array) -> jax.Array:
    """Token embeddings (B, S, D) with each row's image features at its `<|image_pad|>` slots.

    tokens (B, S) int; images uint8 (B, I, H, W, 3), in the row's order of appearance."""
    x = model.text.embed_tokens(tokens)
    if model.vision is None:
        return x
    vcfg = model.cfg.vision
    b, slots, h, w, _ = images.shape
    grid = ((1, h // vcfg.patch_size, w // vcfg.patch_size),) * (b * slots)
    feats = model.vision(patchify(images.reshape(b * slots, h, w, -1), vcfg), grid)
    per_image = feats.shape[0] // (b * slots)
    feats = feats.reshape(b, slots * per_image, -1).astype(x.dtype)
    is_img = tokens == model.cfg.image_token_id
    k = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, slots * per_image - 1)
    img_embeds = jnp.take_along_axis(feats, k[..., None], axis=1)
    return jnp.where(is_img[..., None], img_embeds, x)


def packed_lm_loss(
    model: Qwen25VL,
    tokens: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    images: jax.Array,
    branch_ids: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy (nats) over `loss_mask`; attention stays inside each packed
    document (`segment_ids`, 0 = padding) and branch (`branch_ids`).
    -> (loss, {"accuracy", "target_tokens"})."""
    embeds = packed_embeds(model, tokens, images)
    hidden, _ = model.forward(
        embeds, positions, kv_mask=segment_ids > 0, segment_ids=segment_ids, branch_ids=branch_ids
    )
    logits = model.logits(hidden)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = loss_mask.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    metrics = {"accuracy": (correct * weight).sum() / count, "target_tokens": weight.sum()}
    return (nll * weight).sum() / count, metrics


class PackedLM(Qwen25VL):
    """A Qwen25VL with the train loop's `loss(batch, key)` over the layout's packed arrays. Its
    parameters are exactly a Qwen25VL's, so `convert.hf_qwen25vl.save` exports it as is."""

    def loss(self, batch: dict[str, jax.Array], key: jax.Array):
        del key  # deterministic: no dropout
        return packed_lm_loss(
            self,
            batch["tokens"],
            batch["targets"],
            batch["text_loss_mask"],
            batch["segment_ids"],
            batch["positions"],
            batch["images"],
            batch["branch_ids"],
        )
