"""Generation modes over a trained Pretzel run folder, each one call of the interleaved sampler
(`pretzel.sampler.sample`): prompts are laid out exactly as training lays its documents.

  t2i         caption -> image
  understand  image + question -> answer (the FAE path)
  interleave  caption -> image, text, image, ... (up to max_images), one pass
  edit        image + instruction -> image
  reason      question -> (intermediate image(s)) -> answer, ending at the end of the turn
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from pretzel_jax import models
from pretzel_jax.data.layout import Layout
from pretzel_jax.data.pipeline import make_layout
from pretzel_jax.data.schema import ROLE_USER, Segment
from pretzel_jax.pretzel.model import Pretzel
from pretzel_jax.pretzel.sampler import SampleConfig, sample
from pretzel_jax.train.config import saved_config, validate
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.state import build_setup, init_rest, init_state, model_from

MODES = ("t2i", "understand", "interleave", "edit", "reason")


def load_run(run_dir: str | Path) -> tuple[Pretzel, Layout]:
    """A Pretzel stage's run folder (config.json + pretzel.safetensors) -> (model, layout); the
    frozen VLM and FAE come from the files its config names."""
    run = Path(run_dir)
    cfg_file, weights = run / "config.json", run / "pretzel.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is missing: give --run the folder of a finished Pretzel stage "
                "(python -m pretzel_jax.train --config experiments/shapes_stage1.py writes one)"
            )
    config = saved_config(json.loads(cfg_file.read_text()))
    if config.model.kind != "pretzel":
        raise ValueError(f"{cfg_file}: model.kind is {config.model.kind!r}, not 'pretzel'")
    config.model.pretzel.init_from = str(weights)
    validate(config)
    setup = build_setup(config, make_mesh(config.mesh), models.build)
    sources = models.weight_sources(config)
    model = model_from(setup, init_state(setup, sources).params, init_rest(setup, sources))
    return model, make_layout(config.data)


def mode_prompt(
    layout: Layout,
    mode: str,
    latents_per_image: int,
    *,
    text: str,
    image: np.ndarray | None = None,
    max_new: int = 0,
    max_images: int = 2,
) -> tuple[tuple, dict]:
    """One prompt of `mode` laid out as training lays its documents -> (the sampler's prompt,
    the mode's `SampleConfig` fields: max_new, max_images, stop_tokens)."""
    big_l = latents_per_image
    if mode in ("understand", "edit") and image is None:
        raise ValueError(f"mode {mode!r} needs an image")
    stop: tuple[int, ...] = ()
    if mode == "t2i":
        p = layout.prompt([Segment.of_text(text)], open_image=True)
        max_images, max_new = 1, big_l + 1
    elif mode == "understand":
        segs = [Segment.of_image(image, role=ROLE_USER), Segment.of_text(text, role=ROLE_USER)]
        p = layout.prompt(segs, reply=True)
        max_images, stop = 0, (layout.im_end_id,)
    elif mode == "edit":
        p = layout.prompt([Segment.of_image(image), Segment.of_text(text)], open_image=True)
        max_images, max_new = 1, big_l + 1
    elif mode == "interleave":
        p = layout.prompt([Segment.of_text(text)], open_image=True)
        stop = (layout.pad_id,)  # a plain document's end-of-text
    elif mode == "reason":
        p = layout.prompt([Segment.of_text(text, role=ROLE_USER)], reply=True)
        stop = (layout.im_end_id,)
    else:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    fields = dict(
        max_new=max_new or max_images * (big_l + 2) + 64, max_images=max_images, stop_tokens=stop
    )
    return p, fields


def run_mode(
    model: Pretzel,
    layout: Layout,
    mode: str,
    *,
    text: str,
    image: np.ndarray | None = None,
    key: jax.Array,
    guidance: float = 2.0,
    temperature: float = 0.0,
    image_temperature: float = 1.0,
    max_new: int = 0,
    max_images: int = 2,
    jacobi_chunk: int = 0,
    jacobi_tol: float = 0.0,
    negative: str | None = None,
) -> dict:
    """One prompt in `mode` -> dict(text, images (k, H, W, 3) float, tokens, reason).
    jacobi_chunk / jacobi_tol: block-Jacobi image decoding (`SampleConfig`). `negative` (t2i):
    a caption CFG guides away from, in the empty prompt's place."""
    p, fields = mode_prompt(
        layout,
        mode,
        model.cfg.latents_per_image,
        text=text,
        image=image,
        max_new=max_new,
        max_images=max_images,
    )
    cfg = SampleConfig(
        temperature=temperature,
        image_temperature=image_temperature,
        guidance=guidance,
        jacobi_chunk=jacobi_chunk,
        jacobi_tol=jacobi_tol,
        **fields,
    )
    neg = None
    if negative is not None:
        neg = [layout.prompt([Segment.of_text(negative)], open_image=True)[0]]
    (out,) = sample(model, [p], key, cfg, pad_id=layout.pad_id, negative=neg)
    stop = fields["stop_tokens"]
    words = [t for t in out["tokens"] if t not in (layout.image_id, *stop)]
    out["text"] = layout.tokenizer.decode(words, skip_special_tokens=True)
    return out
