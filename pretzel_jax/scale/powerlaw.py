"""Power-law fits and the sweep figure (numpy and PIL only).

`fit_power_law` fits L(C) = a * C^-b, or L(C) = e + a * C^-b with an irreducible term e, by
least squares on log L: for a fixed e the problem is linear in (log a, b); e is found by a 1-D
search on [0, min L). `isoflop_minimum` reads the compute-optimal model size of one budget off
an IsoFLOP profile (a parabola in log N). `plot_sweep` draws the loss against compute (each
run's training curve, its final point and the fitted law) and against the trainable parameter
count, on log-log axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class FitError(ValueError):
    """Too few or unusable points for a fit."""


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = e + a * x^-b (e = 0 without an irreducible term); `rmse_log`: root mean square of
    log y - log fit(x) over the fitted points."""

    a: float
    b: float
    e: float = 0.0
    rmse_log: float = 0.0
    points: int = 0
    irreducible: bool = False  # fitted with the e term (which may come out 0)

    def __call__(self, x):
        return self.e + self.a * np.power(np.asarray(x, np.float64), -self.b)

    def formula(self, y: str = "L", x: str = "C") -> str:
        head = f"{self.e:.4g} + " if self.e or self.irreducible else ""
        return f"{y}({x}) = {head}{self.a:.4g} * {x}^-{self.b:.4g}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _loglog(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares log y = log a - b log x -> (a, b)."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(intercept)), float(-slope)


def _points(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise FitError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(np.unique(x)) < 2:
        raise FitError(f"a power law needs at least 2 distinct x values, got {len(np.unique(x))}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise FitError("x and y must be finite")
    if np.any(x <= 0) or np.any(y <= 0):
        raise FitError("a power law needs positive x and y (fit bits/dim, not a signed NLL)")
    return x, y


def fit_power_law(x: Sequence[float], y: Sequence[float], *, irreducible: bool = False) -> PowerLaw:
    """y = a * x^-b, or e + a * x^-b when `irreducible` (needs 3+ points)."""
    x, y = _points(x, y)

    def at(e: float) -> tuple[float, float, float]:
        a, b = _loglog(x, y - e)
        fit = e + a * x**-b
        if np.any(fit <= 0):
            return a, b, math.inf
        return a, b, float(np.sqrt(np.mean((np.log(y) - np.log(fit)) ** 2)))

    if not irreducible:
        a, b, err = at(0.0)
        return PowerLaw(a, b, 0.0, err, len(x))
    if len(x) < 3:
        raise FitError("a power law with an irreducible term needs at least 3 points")
    top = float(y.min())
    grid = top * (1.0 - np.geomspace(1.0, 1e-4, 400))  # dense near min(y), where e usually is
    errs = [at(e)[2] for e in grid]
    i = int(np.argmin(errs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(60):  # golden-section refinement between the grid neighbours
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if at(m1)[2] <= at(m2)[2]:
            hi = m2
        else:
            lo = m1
    e = 0.5 * (lo + hi)
    a, b, err = at(e)
    if err > errs[i]:
        e = float(grid[i])
        a, b, err = at(e)
    return PowerLaw(a, b, float(e), err, len(x), irreducible=True)


def isoflop_minimum(n: Sequence[float], loss: Sequence[float]) -> tuple[float, float]:
    """(N_opt, L_opt) of one budget's IsoFLOP profile: the vertex of a parabola in log N through
    3+ sizes when it opens upwards and lies inside the sizes, else the best measured size."""
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    best = int(np.argmin(loss))
    if len(n) >= 3:
        c2, c1, c0 = np.polyfit(np.log(n), loss, 2)
        if c2 > 0:
            v = -c1 / (2 * c2)
            if np.log(n).min() <= v <= np.log(n).max():
                return float(math.exp(v)), float(c0 + c1 * v + c2 * v * v)
    return float(n[best]), float(loss[best])


# -- the figure -------------------------------------------------------------------------------

COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values in [lo, hi]: powers of ten (and 3x) over wide ranges, else about `n`
    values of 2 significant digits spread evenly in log space."""
    if hi / lo >= 100:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        out = [10.0**d for d in decades if lo <= 10.0**d <= hi]
        if len(out) < 4:
            out = sorted(out + [3 * 10.0**d for d in decades if lo <= 3 * 10.0**d <= hi])
        return out
    out = []
    for v in np.geomspace(lo, hi, n):
        r = float(f"{v:.2g}")
        if lo <= r <= hi and r not in out:
            out.append(r)
    return out


class _Panel:
    """One log-log plot area of the figure."""

    def __init__(self, draw, box, xs, ys, font, xlabel, ylabel):
        self.draw, self.box, self.font = draw, box, font
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        pad_x = 0.06 * (math.log(x1 / x0) or 1.0)
        pad_y = 0.08 * (math.log(y1 / y0) or 0.2)
        self.lx = (math.log(x0) - pad_x, math.log(x1) + pad_x)
        self.ly = (math.log(y0) - pad_y, math.log(y1) + pad_y)
        left, top, right, bottom = box
        draw.rectangle(box, outline=(0, 0, 0))
        for t in _ticks(*np.exp(self.lx)):
            px = self.px(t, None)[0]
            draw.line([(px, bottom), (px, bottom + 5)], fill=(0, 0, 0))
            draw.line([(px, top), (px, bottom)], fill=(235, 235, 235))
            draw.text((px, bottom + 8), f"{t:.2g}", fill=(0, 0, 0), font=font, anchor="mt")
        for t in _ticks(*np.exp(self.ly)):
            py = self.px(None, t)[1]
            draw.line([(left - 5, py), (left, py)], fill=(0, 0, 0))
            draw.line([(left, py), (right, py)], fill=(235, 235, 235))
            draw.text((left - 8, py), f"{t:.3g}", fill=(0, 0, 0), font=font, anchor="rm")
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text(((left + right) / 2, bottom + 30), xlabel, fill=(0, 0, 0), font=font, anchor="mt")
        draw.text((left, top - 8), ylabel, fill=(0, 0, 0), font=font, anchor="ld")

    def px(self, x, y) -> tuple[float, float]:
        left, top, right, bottom = self.box
        px = py = 0.0
        if x is not None:
            px = left + (math.log(x) - self.lx[0]) / (self.lx[1] - self.lx[0]) * (right - left)
        if y is not None:
            py = bottom - (math.log(y) - self.ly[0]) / (self.ly[1] - self.ly[0]) * (bottom - top)
        return px, py

    def line(self, xs, ys, color, width=1):
        pts = [self.px(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
        if len(pts) > 1:
            self.draw.line(pts, fill=color, width=width)

    def dashed(self, xs, ys, color, width=2):
        pts = [self.px(x, y) for x, y in zip(xs, ys, strict=True)]
        for i in range(0, len(pts) - 1, 2):
            self.draw.line([pts[i], pts[i + 1]], fill=color, width=width)

    def dot(self, x, y, color, r=5, label=None):
        px, py = self.px(x, y)
        self.draw.ellipse([px - r, py - r, px + r, py + r], fill=color, outline=(0, 0, 0))
        if label:
            self.draw.text((px + r + 3, py), label, fill=(0, 0, 0), font=self.font, anchor="lm")


def plot_sweep(
    runs: Sequence[dict],
    path: str | Path,
    *,
    law: PowerLaw | None = None,
    n_law: PowerLaw | None = None,
    optima: Sequence[tuple[float, float, float]] = (),
    title: str = "",
    ylabel: str = "loss",
) -> Path:
    """Write the sweep figure to `path` (PNG). `runs`: dicts with `compute`, `params`, `loss`,
    `label`, `group` (runs of one budget share a colour) and optionally `curve` [(compute,
    loss), ...] (the run's training curve). `law`: the fitted L(C); `optima`: (C, N_opt, L_opt)
    per budget; `n_law`: the fitted N_opt(C)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 1400, 620
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    draw.text((width / 2, 14), title, fill=(0, 0, 0), font=font, anchor="mt")

    groups = list(dict.fromkeys(r["group"] for r in runs))
    color = {g: COLORS[i % len(COLORS)] for i, g in enumerate(groups)}
    # One budget: a colour per run (its curve and point); several: a colour per budget.
    if len(groups) == 1:
        run_color = [COLORS[i % len(COLORS)] for i in range(len(runs))]
    else:
        run_color = [color[r["group"]] for r in runs]
    curve_pts = [p for r in runs for p in r.get("curve", ()) if p[0] > 0 and p[1] > 0]
    cs = [r["compute"] for r in runs] + [p[0] for p in curve_pts]
    ls = [r["loss"] for r in runs] + [p[1] for p in curve_pts]

    left = _Panel(draw, (90, 60, 690, 520), cs, ls, small, "compute C (FLOPs)", ylabel)
    for r, rc in zip(runs, run_color, strict=True):
        curve = r.get("curve", ())
        if curve:
            light = tuple(int(c + 0.5 * (255 - c)) for c in rc)
            left.line([p[0] for p in curve], [p[1] for p in curve], light, width=2)
    if law is not None:
        xs = np.geomspace(*np.exp(left.lx), 80)
        ys = law(xs)
        keep = (ys > np.exp(left.ly[0])) & (ys < np.exp(left.ly[1]))
        left.dashed(xs[keep], ys[keep], (0, 0, 0))
        draw.text((100, 68), law.formula(), fill=(0, 0, 0), font=small, anchor="lt")
    for r, rc in zip(runs, run_color, strict=True):
        left.dot(r["compute"], r["loss"], rc, label=r.get("label"))
    for c, _, lo in optima:
        left.dot(c, lo, (0, 0, 0), r=4)

    ns = [r["params"] for r in runs] + [o[1] for o in optima]
    right = _Panel(
        draw,
        (790, 60, 1350, 520),
        ns,
        [r["loss"] for r in runs] + [o[2] for o in optima],
        small,
        "trainable parameters N",
        ylabel,
    )
    for g in groups:
        mine = sorted((r["params"], r["loss"]) for r in runs if r["group"] == g)
        right.line([p[0] for p in mine], [p[1] for p in mine], color[g], width=2)
    for r, rc in zip(runs, run_color, strict=True):
        right.dot(r["params"], r["loss"], rc)
    for _, n_opt, lo in optima:
        right.dot(n_opt, lo, (0, 0, 0), r=4)
    if n_law is not None:
        draw.text((800, 68), n_law.formula("N_opt"), fill=(0, 0, 0), font=small, anchor="lt")

    # Legend: one entry per budget group.
    y = 590
    x = 90
    for g in groups:
        if len(groups) > 1:
            draw.ellipse([x, y - 5, x + 10, y + 5], fill=color[g], outline=(0, 0, 0))
            x += 16
        draw.text((x, y), str(g), fill=(0, 0, 0), font=small, anchor="lm")
        x += 10 + int(draw.textlength(str(g), font=small))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path
