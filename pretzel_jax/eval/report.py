"""One self-contained HTML page for runs people can look at (every image inlined):

    python -m pretzel_jax.eval.report --run runs/shapes_stage1 --run runs/shapes_stage3 \
        [--out report.html] [--samples 4]

Per run: its report.json numbers; training curves from metrics.jsonl (each step once: a resumed
run's repeated rows keep the last); text-to-image samples per GenEval category with the judge's
verdict under each image; VQA examples (FAE path and native path); edit success and story match
from `tasks.json` (`python -m pretzel_jax.eval.pretzel_tasks`) when the run has one; the run
folder's other PNGs.
`--samples N` (Pretzel stages) also samples N interleaved stories and N edits of held-out
records with `python -m pretzel_jax.sample`'s modes and shows them inline.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from pretzel_jax.eval import vlm_report
from pretzel_jax.eval.image_grid import read_tiles
from pretzel_jax.eval.pretzel_report import GRID_SCALE
from pretzel_jax.eval.pretzel_tasks import FILE as TASKS_FILE
from pretzel_jax.fae.model import to_uint8
from pretzel_jax.sample.pretzel_modes import load_run, run_mode

CURVES = ("loss", "bits_per_dim", "flow_nll", "lm_loss", "lm_accuracy")
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
figure{display:inline-block;margin:2px;text-align:center;font-size:11px;width:72px}
figure img{width:64px;height:64px;image-rendering:pixelated}.ok{color:green}.no{color:red}
svg{border:1px solid #ddd;margin:4px}"""


def png_uri(image) -> str:
    """uint8 array or PIL image -> data: URI."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(image, caption: str = "", cls: str = "") -> str:
    cap = f'<figcaption class="{cls}">{html.escape(caption)}</figcaption>' if caption else ""
    return f'<figure><img src="{png_uri(image)}" alt="{html.escape(caption)}">{cap}</figure>'


def metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> name -> [(step, value)], each step once (the last row wins)."""
    rows: dict[int, dict] = {}
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(int(row["step"]), {}).update(row)
    return {
        name: [(s, float(r[name])) for s, r in sorted(rows.items()) if name in r]
        for name in CURVES
        if any(name in r for r in rows.values())
    }


def svg_curve(name: str, points: list[tuple[int, float]], w: int = 360, h: int = 160) -> str:
    steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    x = 30 + (steps - steps.min()) / max(np.ptp(steps), 1) * (w - 40)
    y = h - 20 - (values - values.min()) / max(np.ptp(values), 1e-12) * (h - 40)
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))
    return (
        f'<svg width="{w}" height="{h}"><text x="30" y="14" font-size="12">{name}: '
        f"{values[0]:.4g} -> {values[-1]:.4g} (step {steps[-1]})</text>"
        f'<polyline fill="none" stroke="#36c" points="{line}"/></svg>'
    )


def t2i_section(run: Path, report: dict) -> str:
    parts = []
    for split in ("test", "heldout"):
        path, prompts = run / f"t2i_{split}.png", report.get(f"t2i_{split}_prompts")
        cats = report.get(f"t2i_{split}_categories")
        if not (path.is_file() and prompts and cats):
            continue
        verdicts = report.get(f"t2i_{split}_verdicts") or [None] * len(prompts)
        cols = cats.count(cats[0])
        tiles = read_tiles(path, cols, len(prompts), scale=GRID_SCALE)
        prefix = "t2i_" if split == "test" else "t2i_heldout_"
        parts.append(f"<h3>text to image, {split} pairs</h3>")
        for cat in dict.fromkeys(cats):
            score = report.get(prefix + cat)
            head = f"{cat}: {score:.3f}" if isinstance(score, float) else cat
            figs = []
            for tile, p, c, ok in zip(tiles, prompts, cats, verdicts, strict=True):
                if c == cat:
                    mark = "" if ok is None else (" ✓" if ok else " ✗")
                    figs.append(_img(tile, p + mark, "" if ok is None else ("ok" if ok else "no")))
            parts.append(f"<h4>{html.escape(head)}</h4>" + "".join(figs))
    return "".join(parts)


def vqa_section(report: dict) -> str:
    ex = report.get("vqa_examples")
    if not ex:
        return ""
    fae, native = ex.get("fae", []), ex.get("native", [])
    rows = "".join(
        f"<tr><td>{html.escape(e['question'])}</td><td>{html.escape(str(e['truth']))}</td>"
        f"<td>{html.escape(e['answer'])}</td>"
        f"<td>{html.escape(native[i]['answer']) if i < len(native) else ''}</td></tr>"
        for i, e in enumerate(fae)
    )
    return (
        "<h3>VQA examples</h3><table><tr><th>question</th><th>truth</th><th>FAE path</th>"
        f"<th>native path</th></tr>{rows}</table>"
    )


def samples_section(run: Path, n: int) -> str:
    """Interleaved stories and edits sampled from a Pretzel stage (held-out records)."""
    model, layout = load_run(run)
    data_cfg = ConfigDict(json.loads((run / "config.json").read_text())["data"])
    parts = ["<h3>interleaved stories (held-out first captions)</h3>"]
    for i, doc in enumerate(vlm_report._records(data_cfg, "interleaved", "heldout", n)):
        first = doc.segments[0].text
        out = run_mode(model, layout, "interleave", text=first, key=jax.random.key(i))
        images = "".join(_img(to_uint8(im)) for im in out.get("images", []))
        parts.append(f"<p><b>{html.escape(first)}</b> {html.escape(out['text'])}</p>{images}")
    parts.append("<h3>edits (held-out records: source, instruction, edited, reference)</h3>")
    for i, doc in enumerate(vlm_report._records(data_cfg, "edit", "heldout", n)):
        src, text, ref = doc.segments[0].image, doc.segments[1].text, doc.segments[2].image
        out = run_mode(model, layout, "edit", text=text, image=src, key=jax.random.key(i))
        edited = out["images"][0] if len(out.get("images", [])) else np.zeros_like(src)
        figs = _img(src, "source") + _img(to_uint8(edited), "edited") + _img(ref, "reference")
        parts.append(f"<p>{html.escape(text)}</p>{figs}")
    return "".join(parts)


def run_section(run: Path, samples: int = 0) -> str:
    report = {}
    if (run / "report.json").is_file():
        report = json.loads((run / "report.json").read_text())
    config = {}
    if (run / "config.json").is_file():
        config = json.loads((run / "config.json").read_text())
    kind = config.get("model", {}).get("kind", "?")
    if (run / TASKS_FILE).is_file():  # eval.pretzel_tasks: edit success, story match
        report = {**report, **json.loads((run / TASKS_FILE).read_text())}
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in scalars.items()
    )
    curves = "".join(svg_curve(k, v) for k, v in metrics(run).items() if v)
    shown = (
        {f"t2i_{s}.png" for s in ("test", "heldout")} if "t2i_test_categories" in report else set()
    )
    others = "".join(
        f'<h3>{html.escape(p.name)}</h3><img src="{png_uri(Image.open(p).convert("RGB"))}">'
        for p in sorted(run.glob("*.png"))
        if p.name not in shown
    )
    extra = samples_section(run, samples) if samples and kind == "pretzel" else ""
    return (
        f"<h2>{html.escape(str(run))} (kind {html.escape(kind)})</h2>"
        f"<table>{rows}</table>{curves}{t2i_section(run, report)}{vqa_section(report)}"
        f"{extra}{others}"
    )


def build(runs: list[Path], samples: int = 0) -> str:
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"no run folder {', '.join(missing)}; give --run a run's folder")
    body = "".join(run_section(r, samples) for r in runs)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>pretzel_jax report</title>'
        f"<style>{STYLE}</style></head><body><h1>pretzel_jax report</h1>{body}</body></html>\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretzel_jax.eval.report", description=__doc__)
    ap.add_argument("--run", action="append", required=True, type=Path)
    ap.add_argument("--out", default="report.html", type=Path)
    ap.add_argument("--samples", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        page = build(args.run, args.samples)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    args.out.write_text(page)
    print(f"wrote {args.out} ({len(page) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
