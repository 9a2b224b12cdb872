"""Ask a local Qwen2.5-VL checkpoint about images from the command line.

    python -m pretzel_jax.vlm.chat --ckpt DIR --image cat.png --prompt "What is in the image?" \
        [--image more.png ...] [--max_new_tokens 128] [--temperature 0] [--top_k 0] [--top_p 1]
        [--seed 0] [--dtype float32|bfloat16]

DIR is a downloaded Hugging Face folder: config.json, *.safetensors (+ index), tokenizer.json,
tokenizer_config.json / chat_template.json, and optionally preprocessor_config.json (image sizes;
Qwen2.5-VL's defaults otherwise) and generation_config.json (stop tokens; config.json's eos
otherwise, plus `<|im_end|>`). The prompt is one user turn: the images, then the text. Prints
the answer. Temperature 0 is greedy decoding.

This is an application entry point: unlike the rest of `vlm/` it uses `convert` (weight import).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from pretzel_jax.vlm import image_processing
from pretzel_jax.vlm.generate import generate
from pretzel_jax.vlm.tokenizer import QwenTokenizer


def image_options(folder: Path) -> dict:
    """preprocess_images keywords from preprocessor_config.json (old and new layouts)."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return {}
    cfg = json.loads(file.read_text())
    size = cfg.get("size") or {}
    opts = {
        "min_pixels": cfg.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": cfg.get("max_pixels", size.get("longest_edge")),
        "patch_size": cfg.get("patch_size"),
        "temporal_patch_size": cfg.get("temporal_patch_size"),
        "merge_size": cfg.get("merge_size"),
        "mean": cfg.get("image_mean"),
        "std": cfg.get("image_std"),
    }
    return {k: v for k, v in opts.items() if v is not None}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]


def stop_and_pad(folder: Path, cfg, tokenizer: QwenTokenizer) -> tuple[list[int], int]:
    gen_file = folder / "generation_config.json"
    gen_cfg = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    stops = _ids(gen_cfg.get("eos_token_id")) or _ids(cfg.eos_token_id)
    im_end = tokenizer.tokenizer.token_to_id("<|im_end|>")
    if im_end is not None and im_end not in stops:
        stops.append(im_end)
    pad = gen_cfg.get("pad_token_id")
    if pad is None:
        pad = tokenizer.tokenizer.token_to_id(tokenizer.special_tokens.get("pad_token") or "")
    return stops, int(pad if pad is not None else (stops[0] if stops else 0))


def answer(
    ckpt: str | Path,
    prompt: str,
    images: Sequence[str | Path | Image.Image] = (),
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    model=None,
) -> str:
    """The decoded answer (special tokens skipped). `model` skips the weight import (tests)."""
    folder = Path(ckpt)
    tokenizer = QwenTokenizer.from_folder(folder)
    if model is None:
        from pretzel_jax.convert.hf_qwen25vl import load

        model = load(folder, dtype=jnp.dtype(dtype))
    cfg = model.cfg
    pixel_values = grid = None
    merge = cfg.vision.spatial_merge_size if cfg.vision is not None else 1
    if images:
        if cfg.vision is None:
            raise ValueError(f"{folder} holds a text-only model; drop --image")
        pil = []
        for img in images:
            if isinstance(img, Image.Image):
                pil.append(img)
                continue
            try:
                pil.append(Image.open(img))
            except (FileNotFoundError, OSError) as e:
                raise ValueError(f"cannot read image {img}: {e}") from None
        opts = {"merge_size": merge} | image_options(folder)
        pixel_values, grid = image_processing.preprocess_images(pil, **opts)
        merge = opts["merge_size"]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    ids = tokenizer.encode_chat([{"role": "user", "content": content}], grid, merge_size=merge)
    stops, pad = stop_and_pad(folder, cfg, tokenizer)
    out = generate(
        model,
        np.asarray([ids]),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stops,
        pad_token_id=pad,
        seed=seed,
    )
    return tokenizer.decode(out.tokens[0, : out.lengths[0]], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    try:
        text = answer(
            args.ckpt,
            args.prompt,
            args.image,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            dtype=args.dtype,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
