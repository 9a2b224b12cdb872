"""Text-to-image judge scores of a trained Pretzel stage over CFG scales and noise temperatures
(fresh GenEval-style prompts, seen shape-colour pairs), to pick the report's defaults.

    python benchmarks/pretzel_t2i_sweep.py --config experiments/shapes_stage1.py \
        --weights runs/shapes_stage1/pretzel.safetensors --guidance 0,1,2,3 --temperature 1,0.8 \
        [--seeds 2] [--negative contrast]

Scores are means over `--seeds` samples of each prompt. A second table says how many objects the
judge found against how many each prompt names (its queries' counts summed): the share of samples
with exactly that many, with none, and the mean found per sample against the mean asked.
`--negative contrast`: CFG against each prompt's `contrast_prompt` (its shapes and colours
swapped, the same objects) instead of the empty prompt.
"""

from __future__ import annotations

import argparse

import numpy as np

from pretzel_jax import models
from pretzel_jax.data.pipeline import make_layout
from pretzel_jax.data.shapes.grammar import contrast_prompt, geneval_prompts, prompt_text
from pretzel_jax.data.shapes.scene import is_seen_combo
from pretzel_jax.eval import shapes_judge
from pretzel_jax.eval.pretzel_report import sample_images
from pretzel_jax.train.config import load_config
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.state import build_setup, init_rest, init_state, model_from


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--guidance", default="0,1,2,3")
    ap.add_argument("--temperature", default="1")
    ap.add_argument("--per_category", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--negative", choices=("empty", "contrast"), default="empty")
    args = ap.parse_args()
    config = load_config(args.config, overrides=[f"model.pretzel.init_from={args.weights}"])
    setup = build_setup(config, make_mesh(config.mesh), models.build)
    sources = models.weight_sources(config)
    model = model_from(setup, init_state(setup, sources).params, init_rest(setup, sources))
    layout = make_layout(config.data)
    judge = shapes_judge.load()
    prompts = geneval_prompts(np.random.default_rng(0), args.per_category, allowed=is_seen_combo)
    negatives = None
    if args.negative == "contrast":
        rng = np.random.default_rng(1)
        negatives = [prompt_text(contrast_prompt(p.spec, rng)) for p in prompts]
    categories = sorted({p.category for p in prompts})
    asked = np.array([sum(q.count for q in p.spec.objects) for p in prompts])
    in_category = {c: np.array([p.category == c for p in prompts]) for c in categories}
    print(f"| guidance | temperature | overall | {' | '.join(categories)} |")
    counts = []
    for w in map(float, args.guidance.split(",")):
        for t in map(float, args.temperature.split(",")):
            scores, found = [], []
            for seed in range(args.seeds):
                images = sample_images(
                    model,
                    layout,
                    [p.text for p in prompts],
                    seed=seed,
                    guidance=w,
                    batch_size=args.batch,
                    temperature=t,
                    negatives=negatives,
                )
                scores.append(judge.score(images, prompts))
                found.append([len(scene.objects) for scene in judge.parse(images)])
            mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
            cats = " | ".join(f"{mean[c]:.3f}" for c in categories)
            print(f"| {w} | {t} | {mean['overall']:.3f} | {cats} |", flush=True)
            counts.append((w, t, np.asarray(found)))
    print(
        "\nObjects found against asked, per category: share with exactly as many / share "
        "empty / mean found (mean asked)"
    )
    print(f"| guidance | temperature | {' | '.join(categories)} |")
    for w, t, found in counts:
        cells = []
        for c in categories:
            f, a = found[:, in_category[c]], asked[in_category[c]]
            cells.append(
                f"{np.mean(f == a):.2f} / {np.mean(f == 0):.2f} / {f.mean():.1f} ({a.mean():.1f})"
            )
        print(f"| {w} | {t} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
