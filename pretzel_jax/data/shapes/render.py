"""Renders a `SceneSpec` to an anti-aliased RGB image.

Each object is drawn inside its grid cell, its centre jittered a little (never so far that any
part, edge blur included, leaves the cell). Anti-aliasing by supersampling: the scene is drawn at
`SUPERSAMPLE` x the resolution with hard edges and box-filtered down, so edge pixels mix object
and background while pixels wholly inside an object keep its exact colour.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from pretzel_jax.data.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    COLS,
    ROWS,
    SIZES,
    ObjectSpec,
    SceneSpec,
)

SUPERSAMPLE = 4
# Gap kept between an object and its cell's border, as a fraction of the cell side.
CELL_MARGIN = 0.06
STRIPE_PERIOD = 4  # pixels, for the "striped" background


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an object was drawn, in output pixels (x right, y down; pixel i spans [i, i+1)).

    The object lies in [cx - half, cx + half] x [cy - half, cy + half].
    """

    obj: ObjectSpec
    cx: float
    cy: float
    half: float


def default_rng(spec: SceneSpec, size: int) -> np.random.Generator:
    """The generator `render` uses when given none: seeded by the spec, so a spec has one image."""
    return np.random.default_rng(zlib.crc32(f"{spec.to_json()}|{size}".encode()))


def place(spec: SceneSpec, size: int, seed: int) -> list[Placement]:
    """Jittered placements of `spec`'s objects; each cell's jitter depends only on (seed, cell)."""
    cell = size / 3
    placements = []
    for obj in spec.objects:
        row, col = obj.cell
        half = SIZES[obj.size] * cell / 2
        slack = max(cell / 2 - half - CELL_MARGIN * cell, 0.0)
        dx, dy = np.random.default_rng([seed, row, col]).uniform(-slack, slack, size=2)
        placements.append(Placement(obj, (col + 0.5) * cell + dx, (row + 0.5) * cell + dy, half))
    return placements


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    """Boolean mask of `shape` centred at 0 with half-extent `half`, at offsets (x, y)."""
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (y <= half) & (np.abs(x) <= (y + half) / 2)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= half
    raise ValueError(f"No drawing rule for shape {shape!r}.")


def background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (size, size, 3) background: plain, or a light grey texture of small amplitude."""
    base, amplitude = BACKGROUNDS[name]
    image = np.broadcast_to(np.asarray(base, np.float32), (size, size, 3)).copy()
    if name == "speckled":
        image += rng.uniform(-amplitude, amplitude, size=(size, size, 1)).astype(np.float32)
    elif name == "striped":
        phase = rng.uniform(0, STRIPE_PERIOD)
        ij = np.add.outer(np.arange(size), np.arange(size)) + phase
        image += (amplitude * np.sin(2 * np.pi * ij / STRIPE_PERIOD))[..., None].astype(np.float32)
    elif amplitude:
        raise ValueError(f"No texture rule for background {name!r}.")
    return image


def render_with_placements(
    spec: SceneSpec, size: int = 32, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, list[Placement]]:
    """`render`, also returning where each object went."""
    if size < 12:
        raise ValueError(f"Image size {size} is too small for a 3x3 grid of objects; use >= 12.")
    rng = default_rng(spec, size) if rng is None else rng
    seed = int(rng.integers(2**63))
    placements = place(spec, size, seed)
    texture_rng = np.random.default_rng([seed, len(ROWS) * len(COLS)])
    ss = SUPERSAMPLE
    canvas = np.repeat(np.repeat(background(spec.background, size, texture_rng), ss, 0), ss, 1)
    # Sample points at sub-pixel centres, in output pixel units.
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    for p in placements:
        lo_x, hi_x = int(np.floor((p.cx - p.half) * ss)), int(np.ceil((p.cx + p.half) * ss))
        lo_y, hi_y = int(np.floor((p.cy - p.half) * ss)), int(np.ceil((p.cy + p.half) * ss))
        x = coords[lo_x:hi_x][None, :] - p.cx
        y = coords[lo_y:hi_y][:, None] - p.cy
        mask = shape_mask(p.obj.shape, x, y, p.half)
        canvas[lo_y:hi_y, lo_x:hi_x][mask] = COLORS[p.obj.color]
    image = canvas.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), placements


def render(spec: SceneSpec, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (size, size, 3) image of `spec`.

    Deterministic: the jitter and texture come from one number drawn from `rng`, or, when it is
    None, from a generator seeded by the spec and size (so the same spec always renders the same).
    Each cell's jitter and the texture depend only on that number, so two specs rendered with
    generators in the same state (e.g. an edit's source and target) differ only in the cells whose
    object changed.
    """
    return render_with_placements(spec, size, rng)[0]
