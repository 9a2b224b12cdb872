"""Edit success and story match of a Pretzel stage on held-out shapes records, by the judge:

    python -m pretzel_jax.eval.pretzel_tasks --run runs/shapes_stage3 [--n 32] [--guidance 8]

- edit: source image + instruction -> one generated image. Success: the judge reads exactly the
  record's target scene (the instructed change and nothing else: every object's shape, colour,
  size and cell, and the background).
- story: a held-out story's opening caption -> one interleaved pass (text and up to
  `--max_images` images). An image matches when the judge's reading of it satisfies the caption
  (the first image), or equals the judge's reading of the previous image changed by the edit the
  text between them narrates ("now the red circle turns blue."; a text that narrates no edit of
  that scene matches nothing). A story matches when it has two images or more and all match.

Beside each rate, the same check on the records' own target images and texts: the judge's
ceiling. Writes `<run>/tasks.json` (the HTML report, `eval.report`, shows its numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from pretzel_jax.data.shapes.grammar import parse_caption
from pretzel_jax.data.shapes.scene import COLORS, COLS, ROWS, SHAPES, SIZES, ObjectSpec, SceneSpec
from pretzel_jax.data.shapes.tasks import Edit
from pretzel_jax.eval import vlm_report
from pretzel_jax.fae.model import to_uint8
from pretzel_jax.pretzel.sampler import SampleConfig, sample
from pretzel_jax.sample.pretzel_modes import load_run, mode_prompt

FILE = "tasks.json"


def candidate_edits(scene: SceneSpec):
    """Every single edit of `scene`: recolour, move to an empty cell, remove, add."""
    empty = [(r, c) for r in ROWS for c in COLS if scene.at(r, c) is None]
    for o in scene.objects:
        for color in COLORS:
            if color != o.color:
                yield Edit("recolor", o, o.replace(color=color))
        for r, c in empty:
            yield Edit("move", o, o.replace(row=r, col=c))
        yield Edit("remove", o, None)
    for (r, c), shape, color, size in itertools.product(empty, SHAPES, COLORS, SIZES):
        yield Edit("add", None, ObjectSpec(shape, color, size, r, c))


def narrated_scenes(scene: SceneSpec, ids: list[int], encode) -> set[SceneSpec]:
    """The scenes `scene` becomes under the edits whose narration encodes to `ids`."""
    out = set()
    for edit in candidate_edits(scene):
        if encode(edit.text(scene, narrated=True)) == ids:
            with contextlib.suppress(ValueError):  # e.g. one object too many
                out.add(edit.apply(scene))
    return out


def story_matches(caption: str, scenes: list[SceneSpec], texts: list[list[int]], encode):
    """Per image of a story: whether it matches (module docstring). `texts[k]`: the ids between
    image k and k + 1."""
    try:
        first = parse_caption(caption.rstrip(". ")).satisfied_by(scenes[0]) if scenes else False
    except ValueError:  # a caption outside the grammar
        first = False
    ok = [first] if scenes else []
    for prev, text, now in zip(scenes, texts, scenes[1:]):
        ok.append(now in narrated_scenes(prev, text, encode))
    return ok


def _split_story(tokens: list[int], layout) -> tuple[int, list[list[int]]]:
    """Generated ids of an interleaved pass opened at its first image -> (images, the text ids
    after each image's `<vision_end>` up to the next `<vision_start>`)."""
    texts, cur, images = [], [], 0
    special = {layout.image_id, layout.pad_id}
    for t in tokens:
        if t == layout.vision_end_id:
            images += 1
            cur = []
        elif t == layout.vision_start_id:
            texts.append(cur)
        elif t not in special:
            cur.append(t)
    return images, texts


def _sample(model, layout, requests, key, guidance: float, batch: int):
    rows = []
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        fields = chunk[0][1]
        cfg = SampleConfig(guidance=guidance, **fields)
        keys = jax.random.split(jax.random.fold_in(key, start), len(chunk))
        rows += sample(model, [p for p, _ in chunk], keys, cfg, pad_id=layout.pad_id)
    return rows


def evaluate(
    run: Path,
    *,
    n: int = 32,
    guidance: float = 8.0,
    max_images: int = 3,
    batch: int = 16,
    seed: int = 0,
    judge=None,
) -> dict:
    from pretzel_jax.eval import shapes_judge

    judge = judge or shapes_judge.load()
    model, layout = load_run(run)
    data_cfg = ConfigDict(json.loads((run / "config.json").read_text())["data"])
    big_l, key = model.cfg.latents_per_image, jax.random.key(seed)
    encode = layout.encode

    edits = vlm_report._records(data_cfg, "edit", "heldout", n)
    requests = [
        mode_prompt(layout, "edit", big_l, text=d.segments[1].text, image=d.segments[0].image)
        for d in edits
    ]
    rows = _sample(model, layout, requests, jax.random.fold_in(key, 0), guidance, batch)
    blank = np.zeros_like(edits[0].segments[0].image)
    made = [to_uint8(r["images"][0]) if len(r["x"]) else blank for r in rows]
    want = [SceneSpec.from_dict(json.loads(d.scene)["images"][1]) for d in edits]
    got = judge.parse(np.stack([np.asarray(m) for m in made]))
    refs = judge.parse(np.stack([d.segments[2].image for d in edits]))
    out = {
        "edit_success": float(np.mean([g == w for g, w in zip(got, want, strict=True)])),
        "edit_success_references": float(np.mean([g == w for g, w in zip(refs, want)])),
        "edit_records": float(len(edits)),
    }

    stories = vlm_report._records(data_cfg, "interleaved", "heldout", n)
    requests = [
        mode_prompt(layout, "interleave", big_l, text=d.segments[0].text, max_images=max_images)
        for d in stories
    ]
    rows = _sample(model, layout, requests, jax.random.fold_in(key, 1), guidance, batch)
    matched, images_ok, images_all, ref_matched = [], 0, 0, []
    for d, r in zip(stories, rows, strict=True):
        caption = d.segments[0].text
        count, texts = _split_story(r["tokens"], layout)
        imgs = r.get("images", np.zeros((0,)))[:count]
        scenes = judge.parse(np.asarray(to_uint8(imgs))) if len(imgs) else []
        ok = story_matches(caption, scenes, texts, encode)
        matched.append(len(ok) >= 2 and all(ok))
        images_ok, images_all = images_ok + sum(ok), images_all + len(ok)
        ref_texts = [encode(s.text) for s in d.segments[2::2]]
        ref_images = np.stack([s.image for s in d.segments[1::2]])
        ref_ok = story_matches(caption, judge.parse(ref_images), ref_texts, encode)
        ref_matched.append(all(ref_ok))
    out |= {
        "story_match": float(np.mean(matched)),
        "story_image_match": images_ok / max(images_all, 1),
        "story_images": float(images_all),
        "story_match_references": float(np.mean(ref_matched)),
        "story_records": float(len(stories)),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pretzel_jax.eval.pretzel_tasks", description=__doc__
    )
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--n", type=int, default=32, help="held-out edit and story records each")
    ap.add_argument("--guidance", type=float, default=8.0, help="CFG scale (the reports')")
    ap.add_argument("--max_images", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for f in ("config.json", "pretzel.safetensors"):
        if not (args.run / f).is_file():
            raise SystemExit(
                f"error: {args.run / f} is missing; give --run a finished Pretzel stage"
            )
    out = evaluate(
        args.run, n=args.n, guidance=args.guidance, max_images=args.max_images, seed=args.seed
    )
    (args.run / FILE).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
