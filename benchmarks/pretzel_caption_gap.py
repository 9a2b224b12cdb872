"""How much a trained Pretzel stage's flow uses each word of a caption: the exact NLL of a
rendered one-object scene under its true caption ("a red circle") against the same caption with
the shape or the colour swapped, and against the empty prompt (CFG's unconditional branch).
Each caption sees the same image with the same noise, so the differences are the model's alone.
The scenes cycle through all 24 shape-colour pairs (the 4 held-out pairs included), one object
on a white background, size alternating, cell random.

A flow that reads the shape word must find the image much less likely under a wrong shape; the
likelihood objective pays at most log 4 nats per object for learning that (the shape's entropy
given everything else), against the hundreds of nats an image costs.

    python benchmarks/pretzel_caption_gap.py --run runs/shapes_stage1 [--scenes 48]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.data.schema import Document, Segment
from pretzel_jax.data.shapes.render import render
from pretzel_jax.data.shapes.scene import COLORS, COLS, ROWS, SHAPES, ObjectSpec, SceneSpec
from pretzel_jax.sample.pretzel_modes import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished Pretzel stage's run folder")
    ap.add_argument("--scenes", type=int, default=48)
    args = ap.parse_args()
    model, layout = load_run(args.run)
    graphdef, state = nnx.split(model)
    dims = model.cfg.latents_per_image * model.cfg.flow.token_dim

    @jax.jit
    def nats(state, batch, key):  # per-image NLL of x~ in nats
        m = nnx.merge(graphdef, state)
        return m.image_nll(m.forward(batch, key)) * dims

    def nll(caption: str, image: np.ndarray, key) -> float:
        text = (Segment.of_text(caption),) if caption else ()
        doc = Document("gap", "caption", (*text, Segment.of_image(image, target=True)))
        batch = layout.pack([layout.document(doc)])
        out = np.asarray(nats(state, {k: jnp.asarray(v) for k, v in batch.items()}, key))
        return float(out[batch["image_target"] & batch["image_mask"]][0])

    rng = np.random.default_rng(0)
    colors, gaps = list(COLORS), {"wrong shape": [], "wrong colour": [], "empty prompt": []}
    for i in range(args.scenes):
        shape, color = SHAPES[i % len(SHAPES)], colors[(i // len(SHAPES)) % len(colors)]
        size, row, col = ("small", "large")[i % 2], rng.choice(ROWS), rng.choice(COLS)
        obj = ObjectSpec(shape, color, size, row, col)
        image = render(SceneSpec((obj,), "white"), layout.config.image_size[0])
        key = jax.random.key(i)
        true = nll(f"a {color} {shape}", image, key)
        other_shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        other_color = colors[(colors.index(color) + 1) % len(colors)]
        gaps["wrong shape"].append(nll(f"a {color} {other_shape}", image, key) - true)
        gaps["wrong colour"].append(nll(f"a {other_color} {shape}", image, key) - true)
        gaps["empty prompt"].append(nll("", image, key) - true)
    print(f"{args.run}: NLL(caption) - NLL(true caption), nats per image, {args.scenes} scenes")
    print("| caption | mean | standard error | scenes where it is worse |")
    print("|---|---|---|---|")
    for name, d in gaps.items():
        d = np.asarray(d)
        se = d.std(ddof=1) / np.sqrt(len(d))
        print(f"| {name} | {d.mean():+.2f} | {se:.2f} | {np.mean(d > 0):.0%} |")


if __name__ == "__main__":
    main()
