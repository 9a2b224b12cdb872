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

A second table splits each gap by where in the raster order it arises: the latents before the
object's first (those the object does not cover), the first row of latents the object covers,
the rest of the object, and the background after it. Only the deep block sees the caption, so
its per-latent terms (0.5 z^2 + log sigma) carry the whole gap.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.data.schema import Document, Segment
from pretzel_jax.data.shapes.render import render
from pretzel_jax.data.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    COLS,
    ROWS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
)
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
    def nats(state, batch, key):
        """-> per-image NLL of x~ in nats, and the deep block's NLL terms per position."""
        m = nnx.merge(graphdef, state)
        out = m.forward(batch, key)
        return m.image_nll(out) * dims, out["deep_nll"]

    def nll(caption: str, image: np.ndarray, key) -> tuple[float, np.ndarray]:
        text = (Segment.of_text(caption),) if caption else ()
        doc = Document("gap", "caption", (*text, Segment.of_image(image, target=True)))
        batch = layout.pack([layout.document(doc)])
        out, terms = nats(state, {k: jnp.asarray(v) for k, v in batch.items()}, key)
        latent = np.asarray(batch["tokens"][0] == model.cfg.vlm.image_token_id)
        image_nll = float(np.asarray(out)[batch["image_target"] & batch["image_mask"]][0])
        return image_nll, np.asarray(terms)[0][latent]

    gh, gw = model.cfg.latent_grid
    regions = ("before the object", "object, first row", "object, the rest", "after the object")

    def region_of(image: np.ndarray) -> np.ndarray:
        """Each latent's region (index into `regions`): the object is what differs from the
        white background; a latent covers its patch of image_size / grid pixels."""
        ph, pw = image.shape[0] // gh, image.shape[1] // gw
        white = np.asarray(BACKGROUNDS["white"][0], np.int32)
        ink = (np.abs(image.astype(np.int32) - white).max(-1) > 30).reshape(gh, ph, gw, pw)
        covered = ink.any((1, 3)).reshape(-1)
        first = int(np.argmax(covered))
        first_row = np.arange(gh * gw) // gw == first // gw
        region = np.where(np.arange(gh * gw) < first, 0, 3)
        region = np.where(covered, np.where(first_row, 1, 2), region)
        return region

    rng = np.random.default_rng(0)
    colors, gaps = list(COLORS), {"wrong shape": [], "wrong colour": [], "empty prompt": []}
    by_region = {name: [] for name in gaps}
    for i in range(args.scenes):
        shape, color = SHAPES[i % len(SHAPES)], colors[(i // len(SHAPES)) % len(colors)]
        size, row, col = ("small", "large")[i % 2], rng.choice(ROWS), rng.choice(COLS)
        obj = ObjectSpec(shape, color, size, row, col)
        image = render(SceneSpec((obj,), "white"), layout.config.image_size[0])
        key = jax.random.key(i)
        true, true_terms = nll(f"a {color} {shape}", image, key)
        other_shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        other_color = colors[(colors.index(color) + 1) % len(colors)]
        region = region_of(image)
        for name, caption in (
            ("wrong shape", f"a {color} {other_shape}"),
            ("wrong colour", f"a {other_color} {shape}"),
            ("empty prompt", ""),
        ):
            changed, terms = nll(caption, image, key)
            gaps[name].append(changed - true)
            diff = terms - true_terms
            by_region[name].append([diff[region == r].sum() for r in range(len(regions))])
    print(f"{args.run}: NLL(caption) - NLL(true caption), nats per image, {args.scenes} scenes")
    print("| caption | mean | standard error | scenes where it is worse |")
    print("|---|---|---|---|")
    for name, d in gaps.items():
        d = np.asarray(d)
        se = d.std(ddof=1) / np.sqrt(len(d))
        print(f"| {name} | {d.mean():+.2f} | {se:.2f} | {np.mean(d > 0):.0%} |")
    print("\nThe same gaps by region of the raster order (nats per image, mean):")
    print("| caption | " + " | ".join(regions) + " |")
    print("|---|" + "---|" * len(regions))
    for name, rows in by_region.items():
        print(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in np.mean(rows, 0)) + " |")


if __name__ == "__main__":
    main()
