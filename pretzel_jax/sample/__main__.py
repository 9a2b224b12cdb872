"""Sample a trained Pretzel stage: writes PNGs and record.json into --out.

    python -m pretzel_jax.sample t2i --run runs/shapes_stage3 --text "a red circle" --out /tmp/s
    python -m pretzel_jax.sample t2i --run RUN --text "a red circle" --negative "a blue square"
    python -m pretzel_jax.sample understand --run RUN --image a.png --text "what shape is it?"
    python -m pretzel_jax.sample interleave --run RUN --text "a blue square." --max_images 2
    python -m pretzel_jax.sample edit --run RUN --image a.png --text "make the square red"
    python -m pretzel_jax.sample reason --run RUN --text "how many circles are there?"

--text may repeat (one sample each, a progress bar over them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from pretzel_jax.fae.model import to_uint8
from pretzel_jax.sample.pretzel_modes import MODES, load_run, run_mode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretzel_jax.sample", description=__doc__)
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--run", required=True, help="a Pretzel stage's run folder")
    ap.add_argument("--text", action="append", required=True)
    ap.add_argument("--image", help="PNG for understand / edit")
    ap.add_argument("--out", default="samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG scale on image latents")
    ap.add_argument("--temperature", type=float, default=0.0, help="text; 0 = greedy")
    ap.add_argument("--image_temperature", type=float, default=1.0)
    ap.add_argument("--max_images", type=int, default=2)
    ap.add_argument("--max_new", type=int, default=0, help="positions per sample; 0 = enough")
    ap.add_argument(
        "--jacobi_chunk", type=int, default=0, help="block-Jacobi latents per call; 0 = one by one"
    )
    ap.add_argument("--jacobi_tol", type=float, default=0.0, help="0 = the sequential latents")
    ap.add_argument(
        "--negative", help="t2i: a caption CFG guides away from (default: the empty one)"
    )
    args = ap.parse_args(argv)
    if args.negative is not None and args.mode != "t2i":
        sys.exit(f"error: --negative applies to mode t2i, not {args.mode}")
    try:
        image = None
        if args.image:
            if not Path(args.image).is_file():
                raise FileNotFoundError(f"--image {args.image}: no such file")
            image = np.asarray(Image.open(args.image).convert("RGB"))
        model, layout = load_run(args.run)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, text in enumerate(tqdm(args.text, desc=args.mode, disable=len(args.text) < 2)):
        res = run_mode(
            model,
            layout,
            args.mode,
            text=text,
            image=image,
            key=jax.random.fold_in(jax.random.key(args.seed), i),
            guidance=args.guidance,
            temperature=args.temperature,
            image_temperature=args.image_temperature,
            max_new=args.max_new,
            max_images=args.max_images,
            jacobi_chunk=args.jacobi_chunk,
            jacobi_tol=args.jacobi_tol,
            negative=args.negative,
        )
        files = []
        for k, img in enumerate(res.get("images", [])):
            files.append(f"{i:03d}_{k}.png")
            Image.fromarray(np.asarray(to_uint8(img))).save(out / files[-1])
        records.append(
            dict(
                prompt=text,
                text=res["text"],
                images=files,
                reason=res["reason"],
                jacobi_calls=res["jacobi_calls"],  # 0: latents one at a time
            )
        )
        print(f"[{i}] {res['reason']}: {res['text']!r} {' '.join(files)}")
    meta = {k: v for k, v in vars(args).items() if k != "text"}
    (out / "record.json").write_text(json.dumps(dict(meta, samples=records), indent=2) + "\n")
    print(f"wrote {out / 'record.json'}")


if __name__ == "__main__":
    main()
