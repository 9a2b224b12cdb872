"""The interleaved sampler on a trained Pretzel stage, side by side in one run:

1. end to end, batch 8, per row 2 generated images and 64 text tokens (a fixed schedule:
   the prompt opens image 1, 32 text tokens, image 2, 32 text tokens), CFG 2: the joint cache
   (generated latents enter the cache as they are) against the BAGEL-style baseline
   (`SampleConfig.reencode`: each image decoded, re-encoded through the FAE and the shallow
   blocks, the sequence re-prefilled);
2. text-to-image, batch 8, CFG 2: latents one at a time against block-Jacobi (chunks of 8 and
   16 latents, at tol 0 and 1e-3), wall time, model calls and the largest latent difference;
3. one decode step (batch 8) at cache position 10 and 1000, text mode and image mode.

    python benchmarks/pretzel_sampler.py --run runs/shapes_stage3 [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.data.schema import Segment
from pretzel_jax.pretzel.sampler import SampleConfig, sample
from pretzel_jax.sample.pretzel_modes import load_run

CAPTIONS = [
    "a red circle.",
    "two blue squares.",
    "a green triangle above a yellow circle.",
    "three circles.",
    "a purple square on the left.",
    "a blue circle and a red square.",
    "an orange triangle.",
    "a small green square.",
]


def _median_s(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def end_to_end(model, layout, repeats: int) -> None:
    big_l = model.cfg.latents_per_image
    prompts = [layout.prompt([Segment.of_text(c)], open_image=True) for c in CAPTIONS]
    base = dict(
        max_new=(big_l + 1) + 32 + (big_l + 2) + 32,
        max_images=2,
        image_every=32,
        temperature=1.0,
        guidance=2.0,
    )
    rows = {}
    key = jax.random.key(0)
    for name, reencode in (("joint cache", False), ("re-encode + re-prefill", True)):
        cfg = SampleConfig(**base, reencode=reencode)
        out = sample(model, prompts, key, cfg, pad_id=layout.pad_id)
        images = sum(len(r["u"]) for r in out) / len(out)
        text = sum(len([t for t in r["tokens"] if t != layout.image_id]) for r in out) / len(out)
        s = _median_s(lambda c=cfg: sample(model, prompts, key, c, pad_id=layout.pad_id), repeats)
        rows[name] = s
        print(f"| {name} | {images:.1f} | {text:.0f} | {s:.2f} | {rows['joint cache'] / s:.2f} |")


def jacobi(model, layout, repeats: int) -> None:
    big_l = model.cfg.latents_per_image
    prompts = [layout.prompt([Segment.of_text(c)], open_image=True) for c in CAPTIONS]
    key = jax.random.key(0)
    runs = [("one at a time", 0, 0.0)]
    runs += [(f"Jacobi K={k}, tol={t:g}", k, t) for k in (8, 16) for t in (0.0, 1e-3)]
    ref = seq = None
    for name, chunk, tol in runs:
        cfg = SampleConfig(
            max_new=big_l + 1, guidance=2.0, image_temperature=1.0, jacobi_chunk=chunk,
            jacobi_tol=tol,
        )  # fmt: skip
        out = sample(model, prompts, key, cfg, pad_id=layout.pad_id)
        u = jnp.stack([r["u"] for r in out])
        ref = u if ref is None else ref
        calls = out[0]["jacobi_calls"] or big_l
        s = _median_s(lambda c=cfg: sample(model, prompts, key, c, pad_id=layout.pad_id), repeats)
        seq = seq or s
        diff = float(jnp.abs(u - ref).max())
        print(f"| {name} | {calls} | {s:.2f} | {seq / s:.2f} | {diff:.1e} |")


def step_cost(model, repeats: int) -> None:
    b, size = 8, 1024
    graphdef, state = nnx.split(model)
    c = model.cfg.flow.token_dim

    @jax.jit
    def step(state, tokens, latents, positions, cache):
        return nnx.merge(graphdef, state).step(tokens, latents, positions, cache)

    cache0 = model.init_cache(b, size)
    for mode, token in (("text", 5), ("image", model.cfg.vlm.image_token_id)):
        times = {}
        for at in (10, 1000):
            cache = cache0.at(at)
            tokens = jnp.full((b, 1), token, jnp.int32)
            latents = jnp.ones((b, 1, c), jnp.float32)
            positions = jnp.full((b, 1, 3), at, jnp.int32)

            def run(cache=cache, tokens=tokens, latents=latents, positions=positions):
                jax.block_until_ready(step(state, tokens, latents, positions, cache))

            times[at] = _median_s(run, repeats)
        ratio = times[1000] / times[10]
        print(f"| {mode} | {times[10] * 1e3:.2f} | {times[1000] * 1e3:.2f} | {ratio:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, layout = load_run(args.run)
    print(f"load average {os.getloadavg()[0]:.2f}, {jax.devices()[0].platform}")
    print("| sampler | images / row | text tokens / row | median s | speed-up |")
    print("|---|---|---|---|---|")
    end_to_end(model, layout, args.repeats)
    print("\n| text-to-image latents | model calls | median s | speed-up | max latent diff |")
    print("|---|---|---|---|---|")
    jacobi(model, layout, args.repeats)
    print("\n| decode step (batch 8) | ms at position 10 | ms at position 1000 | ratio |")
    print("|---|---|---|---|")
    step_cost(model, max(args.repeats, 20))


if __name__ == "__main__":
    main()
