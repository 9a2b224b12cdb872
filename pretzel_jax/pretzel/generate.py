"""The generation modes, each one call of the interleaved sampler (`pretzel.sampler`):

- `t2i`: prompt -> one image (the prompt is closed with `<vision_start>`; CFG against the empty
  prompt, training's caption dropout, or against a negative prompt).
- `answer`: a prompt holding images (through the FAE path) -> greedy text until a stop token.
Interleaved text and images in one pass: `sampler.sample` itself.
"""

from __future__ import annotations

import jax
import numpy as np

from pretzel_jax.pretzel.model import Pretzel
from pretzel_jax.pretzel.sampler import SampleConfig, sample, text_positions


def t2i(
    model: Pretzel,
    prompts: list[list[int]],
    key: jax.Array,
    *,
    guidance: float = 0.0,
    pad_id: int = 0,
    temperature: float = 1.0,
    negative: list[list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Prompt token rows (text, without `<vision_start>`) -> dict(u, x (B, L, C) latents,
    images (B, H, W, 3) float in [0, 1] when the model has an FAE). `guidance` > 0 runs CFG
    against the empty prompt, or against `negative` (one token row per prompt, like them).
    `temperature` scales the latent noise."""
    vs = model.cfg.vlm.vision_start_token_id
    rows = [(np.asarray([*p, vs], np.int32), text_positions(len(p) + 1), ()) for p in prompts]
    if negative is not None:
        negative = [np.asarray([*n, vs], np.int32) for n in negative]
    cfg = SampleConfig(
        max_new=model.cfg.latents_per_image + 1,
        max_images=1,
        image_temperature=temperature,
        guidance=guidance,
    )
    out = sample(model, rows, key, cfg, pad_id=pad_id, negative=negative)
    result = {k: np.stack([r[k][0] for r in out]) for k in ("u", "x")}
    if model.fae is not None:
        result["images"] = np.stack([r["images"][0] for r in out])
    return result


def answer(
    model: Pretzel,
    prompts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    key: jax.Array,
    *,
    stop_tokens: list[int],
    max_new_tokens: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy answers. prompts: (tokens (n,), positions (n, 3), images (k, H, W, 3) uint8) per
    row, the images in the order of the row's image slots. -> generated ids per row (stop token
    and what follows removed)."""
    cfg = SampleConfig(max_new=max_new_tokens, max_images=0, stop_tokens=tuple(stop_tokens))
    out = sample(model, prompts, key, cfg, pad_id=pad_id)
    return [[t for t in r["tokens"] if t not in stop_tokens] for r in out]
