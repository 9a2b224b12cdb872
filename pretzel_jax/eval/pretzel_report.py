"""End-of-stage report of the Pretzel model (shapes family), and the stage's weights.

Every stage writes `<run_dir>/pretzel.safetensors` (the next stage's `init_from`) and
`report.json`. What is measured depends on what the stage trained:
- flow (stages 1, 3): text-to-image on fresh GenEval-style prompts (never training captions;
  "test": seen shape-colour pairs, "heldout": the held-out pairs), sampled with the joint cache
  and CFG, decoded by the FAE and scored by the shapes judge per category; and the exact
  per-image bits/dim of the noise-augmented test latents (teacher-forced, target images only).
- understanding (stages 2, 3): greedy VQA on test records through the FAE path (image -> FAE ->
  noise -> shallow blocks -> A(u) in the VLM) against the same frozen VLM reading the images
  through its own vision tower (native path), same questions; and how far the text logits of
  prompts without images moved from the frozen VLM's (max |difference|, argmax agreement).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from pretzel_jax.data.pipeline import make_layout
from pretzel_jax.data.schema import ROLE_USER, Segment
from pretzel_jax.data.shapes.grammar import GENEVAL_CATEGORIES, geneval_prompts
from pretzel_jax.data.shapes.scene import is_heldout_combo, is_seen_combo
from pretzel_jax.eval import vlm_report
from pretzel_jax.eval.image_grid import save_grid
from pretzel_jax.fae.model import to_uint8
from pretzel_jax.pretzel import generate, sampler
from pretzel_jax.pretzel.model import Pretzel

T2I_SPLITS = {"test": is_seen_combo, "heldout": is_heldout_combo}
GRID_SCALE = 2  # sample grids are written enlarged


def sample_images(
    model: Pretzel,
    layout,
    texts: list[str],
    *,
    seed: int,
    guidance: float,
    batch_size: int,
    temperature: float = 1.0,
    negatives: list[str] | None = None,
) -> np.ndarray:
    """Text-to-image samples of `texts` as uint8 (N, H, W, 3), `batch_size` prompts per call
    (the last batch padded: one compiled shape); `negatives`: a negative prompt per text."""
    images = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        negative = None
        if negatives is not None:
            neg = negatives[start : start + batch_size]
            negative = [layout.encode(t) for t in neg + [neg[-1]] * (batch_size - real)]
        gen = generate.t2i(
            model,
            [layout.encode(t) for t in chunk],
            jax.random.fold_in(jax.random.key(seed), start),
            guidance=guidance,
            pad_id=layout.pad_id,
            temperature=temperature,
            negative=negative,
        )
        images.append(np.asarray(to_uint8(gen["images"][:real])))
    return np.concatenate(images)


def t2i_scores(model: Pretzel, layout, judge, rc: ConfigDict, seed: int) -> tuple[dict, dict]:
    out, samples = {}, {}
    for split, allowed in T2I_SPLITS.items():
        prompts = geneval_prompts(np.random.default_rng(seed), rc.t2i_per_category, allowed=allowed)
        texts = [p.text for p in prompts]
        images = sample_images(
            model, layout, texts, seed=seed, guidance=rc.guidance, batch_size=rc.batch_size
        )
        verdicts = None
        if judge is not None:
            scores = judge.score(images, prompts)
            prefix = "t2i_" if split == "test" else "t2i_heldout_"
            out |= {prefix + k: v for k, v in scores.items()}
            verdicts = [bool(v) for v in judge.check(images, prompts)]
        samples[split] = (images, texts, [p.category for p in prompts], verdicts)
    return out, samples


def image_bits_per_dim(model: Pretzel, config, data, key) -> dict:
    """Exact bits/dim of the noise-augmented FAE latents of the eval split's target images."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch, key):
        m = nnx.merge(graphdef, state)
        out = m.forward(batch, key)
        return m.image_bits_per_dim(out), batch["image_target"] & batch["image_mask"]

    values = []
    for i, batch in zip(
        range(config.model.pretzel.report.bpd_batches), data(config.data.eval_split)
    ):
        bpd, target = jax.device_get(
            run(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.fold_in(key, i))
        )
        values.append(bpd[target])
    values = np.concatenate(values) if values else np.zeros(0)
    return {
        "image_bits_per_dim": float(values.mean()) if len(values) else float("nan"),
        "image_bits_per_dim_images": float(len(values)),
    }


class _FaeAsker:
    """(image, question) pairs -> greedy answers through the Pretzel's FAE path."""

    def __init__(self, model: Pretzel, layout, batch: int, key):
        self.model, self.layout, self.batch, self.key = model, layout, batch, key
        self.stop = [layout.im_end_id]

    def prompt(self, image: np.ndarray, text: str):
        segments = [Segment.of_image(image, role=ROLE_USER), Segment.of_text(text, role=ROLE_USER)]
        return self.layout.prompt(segments, reply=True)

    def __call__(self, pairs, max_new_tokens: int) -> list[str]:
        out = []
        for start in range(0, len(pairs), self.batch):
            chunk = pairs[start : start + self.batch]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch - real)
            ids = generate.answer(
                self.model,
                [self.prompt(img, text) for img, text in chunk],
                jax.random.fold_in(self.key, start),
                stop_tokens=self.stop,
                max_new_tokens=max_new_tokens,
                pad_id=self.layout.pad_id,
            )
            out += [self.layout.tokenizer.decode(r, skip_special_tokens=True) for r in ids[:real]]
        return out


def understanding_scores(model: Pretzel, config, layout, key) -> tuple[dict, dict]:
    from pretzel_jax.vlm import QwenTokenizer

    rc, data_cfg = config.model.pretzel.report, config.data
    docs = vlm_report._records(data_cfg, "vqa", "test", rc.vqa_records)
    fae_ask = _FaeAsker(model, layout, rc.batch_size, key)
    fae, fae_examples = vlm_report.vqa_scores(fae_ask, docs, rc.max_answer_tokens)
    out = {"fae_" + k: v for k, v in fae.items()}
    examples = {"fae": fae_examples}
    if model.vlm.vision is not None:
        tokenizer = QwenTokenizer.from_folder(vlm_report.tokenizer_folder(data_cfg))
        opts = vlm_report.image_options(model.vlm, data_cfg.image_size)
        native_ask = vlm_report._Asker(model.vlm, tokenizer, opts, rc.batch_size)
        native, native_examples = vlm_report.vqa_scores(native_ask, docs, rc.max_answer_tokens)
        out |= {"native_" + k: v for k, v in native.items()}
        out["fae_over_native_vqa"] = out["fae_vqa_accuracy"] / max(out["native_vqa_accuracy"], 1e-9)
        examples["native"] = native_examples
    return out, examples


def text_logit_drift(model: Pretzel, layout, config) -> dict:
    """Text-only prompts (test captions as plain text): the Pretzel's logits against the frozen
    VLM's own."""
    docs = vlm_report._records(config.data, "caption", "test", 32)
    rows = [
        np.asarray(layout.encode(d.segments[0].text if d.segments[0].text else "a"), np.int32)
        for d in docs
    ]
    tokens, positions, mask = sampler.right_align(
        rows, [sampler.text_positions(len(r)) for r in rows], layout.pad_id
    )
    seg = mask.astype(np.int32)

    @jax.jit
    def both(tokens, positions, seg):
        u = jnp.zeros((*tokens.shape, model.cfg.flow.token_dim), jnp.float32)
        out = model.streams(tokens, u, positions, seg, jnp.zeros_like(seg))
        y, _ = model.vlm.forward(
            model.vlm.text.embed_tokens(tokens),
            positions,
            kv_mask=seg > 0,
            segment_ids=seg,
            branch_ids=jnp.zeros_like(seg),
        )
        return model.logits(out["hidden"]), model.vlm.logits(y)

    ours, frozen = jax.device_get(both(tokens, positions, seg))
    diff = np.abs(ours - frozen)[mask]
    agree = (ours.argmax(-1) == frozen.argmax(-1))[mask]
    return {
        "text_logits_max_abs_diff": float(diff.max()),
        "text_argmax_agreement": float(agree.mean()),
    }


def _grid_png(images: np.ndarray, path: Path, cols: int = 16) -> None:
    """uint8 (N, H, W, 3) -> rows of `cols` images (the last row padded white), enlarged."""
    pad = -len(images) % cols
    images = np.concatenate([images, np.full((pad, *images.shape[1:]), 255, np.uint8)])
    save_grid(images.reshape(-1, cols, *images.shape[1:]), str(path), scale=GRID_SCALE)


def report(
    model: Pretzel, config, data: Callable[[str], Iterator[dict]], key, run_dir: str
) -> dict[str, float]:
    from pretzel_jax.eval import shapes_judge
    from pretzel_jax.models.pretzel import save_weights

    run_dir = Path(run_dir)
    use_nf, use_ntp = model.cfg.losses
    layout = make_layout(config.data)
    out, extra = {}, {}
    if jax.process_index() == 0:
        save_weights(model, run_dir / "pretzel.safetensors")
    if use_nf:
        out |= image_bits_per_dim(model, config, data, key)
        rc = config.model.pretzel.report
        judge = shapes_judge.load() if rc.judge else None
        scores, samples = t2i_scores(model, layout, judge, rc, config.seed)
        out |= scores
        for split, (images, texts, categories, verdicts) in samples.items():
            # One grid row per GenEval category (t2i_per_category columns); the prompts,
            # categories and judge verdicts in grid order (eval.report shows them per image).
            cols = rc.t2i_per_category
            shown = len(GENEVAL_CATEGORIES) * cols
            _grid_png(images[:shown], run_dir / f"t2i_{split}.png", cols=cols)
            extra[f"t2i_{split}_prompts"] = texts[:shown]
            extra[f"t2i_{split}_categories"] = categories[:shown]
            if verdicts is not None:
                extra[f"t2i_{split}_verdicts"] = verdicts[:shown]
    if use_ntp:
        scores, examples = understanding_scores(model, config, layout, key)
        out |= scores | text_logit_drift(model, layout, config)
        extra["vqa_examples"] = examples
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "report.json"), "w") as f:
            json.dump({**out, **extra}, f, indent=2)
    return out
