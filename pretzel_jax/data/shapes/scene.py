"""Scene specs of the synthetic "shapes" family: the vocabulary, JSON round trip, random scenes.

A scene is 1-3 objects on a 3x3 grid of cells (at most one object per cell) over a background.
Each object has a shape, a named colour, a size and a cell (row, col). The spec is the exact
ground truth every task (captions, VQA, edits) and the judge are checked against.

The held-out compositional split: the (shape, colour) pairs in `HELDOUT_COMBOS` never appear in a
train/validation/test scene, only in split "heldout" (every heldout scene has at least one).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Saturated, well separated hues; none is close to a background (all backgrounds are light grey).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 125, 20),
}
# Object extent as a fraction of its cell's side.
SIZES: dict[str, float] = {"small": 0.5, "large": 0.8}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
# name -> (base RGB, texture amplitude in grey levels; 0 = plain).
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], int]] = {
    "white": ((245, 245, 245), 0),
    "gray": ((205, 205, 205), 0),
    "speckled": ((235, 235, 235), 12),
    "striped": ((225, 225, 225), 10),
}
MAX_OBJECTS = 3

# One pair per shape, each colour at most once, so every shape and every colour is still seen in
# training: only the combination is new.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "green"), ("square", "purple"), ("triangle", "blue"), ("diamond", "yellow")}
)


def is_heldout_combo(shape: str, color: str) -> bool:
    """Whether (shape, colour) is reserved for the heldout split."""
    return (shape, color) in HELDOUT_COMBOS


def is_seen_combo(shape: str, color: str) -> bool:
    """Whether (shape, colour) may appear in train/validation/test."""
    return not is_heldout_combo(shape, color)


def _check_choice(value: Any, choices: Iterable[str], field: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Scene field {field!r} is {value!r}; expected one of {list(choices)}.")


@dataclasses.dataclass(frozen=True, order=True)
class ObjectSpec:
    """One object: what it is (shape, colour, size) and where (grid cell row, col)."""

    shape: str
    color: str
    size: str
    row: str
    col: str

    def __post_init__(self) -> None:
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.color, COLORS, "color")
        _check_choice(self.size, SIZES, "size")
        _check_choice(self.row, ROWS, "row")
        _check_choice(self.col, COLS, "col")

    @property
    def cell(self) -> tuple[int, int]:
        """(row index, col index), 0 = top / left."""
        return ROWS.index(self.row), COLS.index(self.col)

    @property
    def combo(self) -> tuple[str, str]:
        return self.shape, self.color

    def replace(self, **changes: str) -> ObjectSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectSpec:
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or set(d) != set(fields):
            raise ValueError(f"An object must be a dict with exactly the keys {fields}; got {d!r}.")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """A scene: objects in distinct cells (kept in reading order: row, then col) on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        _check_choice(self.background, BACKGROUNDS, "background")
        objects = tuple(sorted(self.objects, key=lambda o: o.cell))
        if not 0 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"A scene holds 0..{MAX_OBJECTS} objects; got {len(objects)}.")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Two objects share a cell in {objects}; one object per cell.")
        object.__setattr__(self, "objects", objects)

    def at(self, row: str, col: str) -> ObjectSpec | None:
        """The object in cell (row, col), or None."""
        return next((o for o in self.objects if (o.row, o.col) == (row, col)), None)

    def free_cells(self) -> list[tuple[str, str]]:
        return [(r, c) for r in ROWS for c in COLS if self.at(r, c) is None]

    def has_heldout_combo(self) -> bool:
        return any(is_heldout_combo(*o.combo) for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        if not isinstance(d, dict) or set(d) != {"objects", "background"}:
            raise ValueError(
                f"A scene must be a dict with keys 'objects', 'background'; got {d!r}."
            )
        return cls(tuple(ObjectSpec.from_dict(o) for o in d["objects"]), d["background"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SceneSpec:
        return cls.from_dict(json.loads(text))


# Chance that a new object copies the shape (and, half the time, the colour) of an earlier one,
# so that counting ("two blue squares") and same-shape questions come up often.
_REPEAT_PROB = 0.35


# Dense labels of a scene for pretraining a vision tower (`cell_labels`): per grid cell in reading
# order, the shape of its object (0 = empty cell, else 1 + index in SHAPES), its colour and its
# size (indices in COLORS and SIZES; -1 = empty cell). The number of classes of each label:
CELL_LABEL_CLASSES: tuple[int, ...] = (len(SHAPES) + 1, len(COLORS), len(SIZES))


def cell_labels(scene: SceneSpec) -> np.ndarray:
    """int32 (len(ROWS) * len(COLS), 3): (shape, colour, size) of each cell's object."""
    labels = np.full((len(ROWS) * len(COLS), 3), -1, np.int32)
    labels[:, 0] = 0
    for o in scene.objects:
        labels[ROWS.index(o.row) * len(COLS) + COLS.index(o.col)] = (
            1 + SHAPES.index(o.shape),
            list(COLORS).index(o.color),
            list(SIZES).index(o.size),
        )
    return labels


def random_object(
    rng: np.random.Generator,
    row: str,
    col: str,
    allowed: Callable[[str, str], bool] = is_seen_combo,
    like: ObjectSpec | None = None,
) -> ObjectSpec:
    """A random object in cell (row, col) whose (shape, colour) satisfies `allowed`.

    With `like`, the shape is copied and the colour too with probability 1/2 (when allowed).
    """
    combos = [(s, c) for s in SHAPES for c in COLORS if allowed(s, c)]
    if not combos:
        raise ValueError("`allowed` rejects every (shape, colour) pair.")
    if like is not None:
        same_shape = [sc for sc in combos if sc[0] == like.shape]
        if like.combo in combos and rng.random() < 0.5:
            combos = [like.combo]
        elif same_shape:
            combos = same_shape
    shape, color = combos[rng.integers(len(combos))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    return ObjectSpec(shape, color, size, row, col)


def random_scene(
    rng: np.random.Generator,
    num_objects: int | None = None,
    allowed: Callable[[str, str], bool] = is_seen_combo,
    background: str | None = None,
) -> SceneSpec:
    """A random scene of `num_objects` (default: uniform 1..3) objects in distinct random cells.

    `allowed(shape, colour)` filters every object's pair; the default keeps out `HELDOUT_COMBOS`
    (train/validation/test scenes). Use `random_heldout_scene` for the heldout split.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}; got {n}.")
    cells = rng.choice(len(ROWS) * len(COLS), size=n, replace=False)
    objects: list[ObjectSpec] = []
    for cell in cells:
        row, col = ROWS[cell // len(COLS)], COLS[cell % len(COLS)]
        like = (
            objects[rng.integers(len(objects))] if objects and rng.random() < _REPEAT_PROB else None
        )
        objects.append(random_object(rng, row, col, allowed, like))
    if background is None:
        background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return SceneSpec(tuple(objects), background)


def random_heldout_scene(rng: np.random.Generator, num_objects: int | None = None) -> SceneSpec:
    """A random scene with at least one `HELDOUT_COMBOS` object (the others unrestricted)."""
    scene = random_scene(rng, num_objects, allowed=lambda s, c: True)
    if scene.has_heldout_combo():
        return scene
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    combos = sorted(HELDOUT_COMBOS)
    shape, color = combos[rng.integers(len(combos))]
    objects[i] = objects[i].replace(shape=shape, color=color)
    return SceneSpec(tuple(objects), scene.background)
