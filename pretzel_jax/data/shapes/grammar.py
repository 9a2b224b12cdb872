"""Captions of shapes scenes, their parser, and GenEval-style prompts.

A caption is the text of a `PromptSpec`: object queries (a shape with an optional size, colour,
grid position and count) joined by "and", or two queries joined by a relation:

    a large red circle at the top left and a small blue square at the center
    two blue squares and a red circle
    a green triangle to the left of a yellow circle
    three circles in the left column

`prompt_text` writes a spec, `parse_caption` reads it back (exactly: `parse_caption(prompt_text(p))
== p`), and `PromptSpec.satisfied_by(scene)` is the check a GenEval-style judge applies: each query
matches exactly `count` objects (numerals: "two blue squares") or at least one ("a"/"an"), and each
relation holds for some pair of matching objects. `scene_captions` writes several true captions per
scene; `geneval_prompts` draws prompts in GenEval's six categories; `contrast_prompt` swaps a
prompt's shapes and colours (a negative prompt for CFG).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pretzel_jax.data.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    COLS,
    MAX_OBJECTS,
    ROWS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
)

NUMERALS: tuple[str, ...] = ("zero", "one", "two", "three")
# relation -> (its words, whether it holds for objects a, b)
RELATIONS: dict[str, tuple[tuple[str, ...], Callable[[ObjectSpec, ObjectSpec], bool]]] = {
    "left of": (("to", "the", "left", "of"), lambda a, b: a.cell[1] < b.cell[1]),
    "right of": (("to", "the", "right", "of"), lambda a, b: a.cell[1] > b.cell[1]),
    "above": (("above",), lambda a, b: a.cell[0] < b.cell[0]),
    "below": (("below",), lambda a, b: a.cell[0] > b.cell[0]),
}
GENEVAL_CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
CENTER_CELL_WORD = "center"  # "at the center" names the middle-center cell

# Every word a caption can hold (the shapes tokenizer's vocabulary is built from these).
GRAMMAR_WORDS: frozenset[str] = frozenset(
    {"a", "an", "and", "at", "in", "the", "row", "column", ",", "."}
    | set(NUMERALS)
    | set(SHAPES)
    | set(PLURALS.values())
    | set(COLORS)
    | set(SIZES)
    | set(ROWS)
    | set(COLS)
    | {w for words, _ in RELATIONS.values() for w in words}
)


@dataclasses.dataclass(frozen=True)
class ObjectQuery:
    """Objects a caption asks for: `shape` and any given attributes.

    exact=False ("a red circle"): at least one matching object; count must be 1.
    exact=True ("two red circles", "one circle"): exactly `count` matching objects.
    """

    shape: str
    color: str | None = None
    size: str | None = None
    row: str | None = None
    col: str | None = None
    count: int = 1
    exact: bool = False

    def __post_init__(self) -> None:
        for field, value, choices in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, (None, *COLORS)),
            ("size", self.size, (None, *SIZES)),
            ("row", self.row, (None, *ROWS)),
            ("col", self.col, (None, *COLS)),
        ):
            if value not in choices:
                raise ValueError(f"Query field {field!r} is {value!r}; expected one of {choices}.")
        if not 1 <= self.count <= MAX_OBJECTS or (not self.exact and self.count != 1):
            raise ValueError(
                f"Query count {self.count} (exact={self.exact}) is not one a caption can say: "
                f"'a' means at least 1; numerals 1..{MAX_OBJECTS} are exact."
            )

    def matches(self, obj: ObjectSpec) -> bool:
        return all(
            want is None or want == getattr(obj, field)
            for field, want in (
                ("shape", self.shape),
                ("color", self.color),
                ("size", self.size),
                ("row", self.row),
                ("col", self.col),
            )
        )

    def satisfied_by(self, scene: SceneSpec) -> bool:
        n = sum(self.matches(o) for o in scene.objects)
        return n == self.count if self.exact else n >= 1


@dataclasses.dataclass(frozen=True)
class Relation:
    """`relation` holds between a match of query `subject` and a match of query `object`."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(
                f"Unknown relation {self.relation!r}; expected one of {list(RELATIONS)}."
            )


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What a caption/prompt asks of an image (see the module docstring)."""

    objects: tuple[ObjectQuery, ...]
    relations: tuple[Relation, ...] = ()

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("A prompt asks for at least one object.")
        for r in self.relations:
            if not (0 <= r.subject < len(self.objects) and 0 <= r.object < len(self.objects)):
                raise ValueError(f"{r} refers to a query outside 0..{len(self.objects) - 1}.")

    def satisfied_by(self, scene: SceneSpec) -> bool:
        if not all(q.satisfied_by(scene) for q in self.objects):
            return False
        for r in self.relations:
            holds = RELATIONS[r.relation][1]
            subjects = [o for o in scene.objects if self.objects[r.subject].matches(o)]
            objects = [o for o in scene.objects if self.objects[r.object].matches(o)]
            if not any(holds(a, b) for a in subjects for b in objects if a is not b):
                return False
        return True

    @property
    def category(self) -> str | None:
        return geneval_category(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        return cls(
            tuple(ObjectQuery(**q) for q in d["objects"]),
            tuple(Relation(**r) for r in d.get("relations", ())),
        )


def geneval_category(prompt: PromptSpec) -> str | None:
    """The GenEval category a prompt belongs to, or None for richer captions (sizes, grid cells).

    single_object "a circle"; two_object "a circle and a square"; counting "two circles";
    colors "a red circle"; position "a circle to the left of a square";
    color_attr "a red circle and a blue square".
    """
    qs = prompt.objects
    if any(q.size or q.row or q.col for q in qs):
        return None
    plain = all(q.color is None and not q.exact for q in qs)
    if len(qs) == 1:
        (q,) = qs
        if q.exact:
            return "counting" if q.color is None else None
        return "single_object" if q.color is None else "colors"
    if len(qs) != 2 or qs[0].shape == qs[1].shape:
        return None
    if prompt.relations:
        ok = (
            plain
            and len(prompt.relations) == 1
            and {
                prompt.relations[0].subject,
                prompt.relations[0].object,
            }
            == {0, 1}
        )
        return "position" if ok else None
    if plain:
        return "two_object"
    if all(q.color is not None and not q.exact for q in qs):
        return "color_attr"
    return None


# ---- Writing ---------------------------------------------------------------------------------


def cell_phrase(row: str | None, col: str | None) -> list[str]:
    """Words placing an object: "at the top left", "at the center", "in the left column"."""
    if row and col:
        cell = [CENTER_CELL_WORD] if (row, col) == ("middle", "center") else [row, col]
        return ["at", "the", *cell]
    if row:
        return ["in", "the", row, "row"]
    if col:
        return ["in", "the", col, "column"]
    return []


def query_words(q: ObjectQuery) -> list[str]:
    words = [w for w in (q.size, q.color) if w]
    words.append(PLURALS[q.shape] if q.count > 1 else q.shape)
    if q.exact:
        det = NUMERALS[q.count]
    else:
        det = "an" if words[0][0] in "aeiou" else "a"
    return [det, *words, *cell_phrase(q.row, q.col)]


def prompt_text(prompt: PromptSpec) -> str:
    """The canonical caption of `prompt` (`parse_caption` inverts it exactly)."""
    parts = [" ".join(query_words(q)) for q in prompt.objects]
    if prompt.relations:
        if len(prompt.objects) != 2 or prompt.relations != (
            Relation(0, prompt.relations[0].relation, 1),
        ):
            raise ValueError(f"Only 'query 0 <relation> query 1' can be written; got {prompt}.")
        return f"{parts[0]} {' '.join(RELATIONS[prompt.relations[0].relation][0])} {parts[1]}"
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ---- Parsing ---------------------------------------------------------------------------------


class CaptionParseError(ValueError):
    """A caption outside the shapes grammar; the message names the offending word."""


def tokenize(text: str) -> list[str]:
    """Lower-case words, with "," "." "?" split off as words of their own."""
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.words = tokenize(text)
        self.i = 0
        for i, w in enumerate(self.words):
            if w not in GRAMMAR_WORDS:
                self.fail(f"unknown word {w!r}", i)

    def fail(self, why: str, at: int | None = None) -> None:
        at = self.i if at is None else at
        where = f"word {at + 1}" if at < len(self.words) else "the end"
        raise CaptionParseError(f"Cannot parse caption {self.text!r}: {why} (at {where}).")

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.words[j] if j < len(self.words) else None

    def take(self, choices: Sequence[str], what: str) -> str:
        w = self.peek()
        if w not in choices:
            self.fail(f"expected {what}, got {w!r}" if w else f"expected {what}, got nothing")
        self.i += 1
        return w

    def prompt(self) -> PromptSpec:
        queries = [self.query()]
        relations = []
        rel = self.relation()
        if rel:
            queries.append(self.query())
            relations.append(Relation(0, rel, 1))
        else:
            while self.peek() in ("and", ","):
                self.i += 1
                if self.words[self.i - 1] == "," and self.peek() == "and":
                    self.i += 1
                queries.append(self.query())
        if self.peek() == ".":
            self.i += 1
        if self.peek() is not None:
            self.fail(f"unexpected word {self.peek()!r} after a complete caption")
        return PromptSpec(tuple(queries), tuple(relations))

    def relation(self) -> str | None:
        for name, (words, _) in RELATIONS.items():
            if tuple(self.words[self.i : self.i + len(words)]) == words:
                self.i += len(words)
                return name
        return None

    def query(self) -> ObjectQuery:
        det = self.take(("a", "an", *NUMERALS[1:]), "'a', 'an' or a number")
        exact = det in NUMERALS
        count = NUMERALS.index(det) if exact else 1
        size = self.take(tuple(SIZES), "a size") if self.peek() in SIZES else None
        color = self.take(tuple(COLORS), "a colour") if self.peek() in COLORS else None
        nouns = tuple(PLURALS.values()) if count > 1 else SHAPES
        if count > 1 and self.peek() in SHAPES:
            self.fail(f"{self.peek()!r} after {det!r} must be plural {PLURALS[self.peek()]!r}")
        if count == 1 and self.peek() in PLURALS.values():
            self.fail(f"plural {self.peek()!r} after {det!r}; use a number above one")
        noun = self.take(nouns, "a shape" if count == 1 else "a plural shape")
        shape = noun if count == 1 else noun[:-1]
        row = col = None
        if self.peek() in ("at", "in"):
            self.i += 1
            self.take(("the",), "'the'")
            w = self.take((CENTER_CELL_WORD, *ROWS, *COLS), "a row, a column or 'center'")
            if w == CENTER_CELL_WORD and self.peek() not in ("row", "column"):
                row, col = "middle", "center"
            elif w in ROWS and self.peek() in COLS:
                row, col = w, self.take(COLS, "a column")
            elif w in ROWS:
                row = w
                self.take(("row",), f"'row' or a column after {w!r}")
            else:
                col = w
                self.take(("column",), f"'column' after {w!r}")
        return ObjectQuery(shape, color, size, row, col, count, exact)


def parse_caption(text: str) -> PromptSpec:
    """The `PromptSpec` of a caption; `CaptionParseError` (naming the word) if it is not one."""
    return _Parser(text).prompt()


# ---- Captions of a scene -----------------------------------------------------------------------


def _grouped(scene: SceneSpec, key: Callable[[ObjectSpec], tuple]) -> list[tuple[ObjectSpec, int]]:
    """(first object, count) per group of `key`, in reading order of first appearance."""
    groups: dict[tuple, list[ObjectSpec]] = {}
    for o in scene.objects:
        groups.setdefault(key(o), []).append(o)
    return [(objs[0], len(objs)) for objs in groups.values()]


def _counted(obj: ObjectSpec, n: int, color: bool) -> ObjectQuery:
    # "two blue squares" is exact; a lone "a blue square" reads as "at least one", also true.
    return ObjectQuery(obj.shape, obj.color if color else None, count=n, exact=n > 1)


def scene_prompts(scene: SceneSpec, rng: np.random.Generator) -> list[PromptSpec]:
    """Several distinct prompts that `scene` satisfies (the caption variants), fixed order."""
    objs = scene.objects
    if not objs:
        raise ValueError("A scene with no objects has no caption.")
    full = PromptSpec(tuple(ObjectQuery(o.shape, o.color, o.size, o.row, o.col) for o in objs))
    by_color = PromptSpec(
        tuple(_counted(o, n, True) for o, n in _grouped(scene, lambda o: o.combo))
    )
    by_shape = PromptSpec(
        tuple(_counted(o, n, False) for o, n in _grouped(scene, lambda o: o.shape))
    )
    sized = PromptSpec(tuple(ObjectQuery(o.shape, o.color, o.size) for o in objs))
    one = objs[rng.integers(len(objs))]
    located = PromptSpec((ObjectQuery(one.shape, one.color, row=one.row, col=one.col),))
    prompts = [full, by_color, by_shape, sized, located]
    pairs = [
        (a, name, b)
        for a in objs
        for b in objs
        for name, (_, holds) in RELATIONS.items()
        if a is not b and holds(a, b)
    ]
    if pairs:
        a, name, b = pairs[rng.integers(len(pairs))]
        q = (ObjectQuery(a.shape, a.color), ObjectQuery(b.shape, b.color))
        prompts.append(PromptSpec(q, (Relation(0, name, 1),)))
    unique: list[PromptSpec] = []
    for p in prompts:
        if p not in unique:
            unique.append(p)
    return unique


def scene_captions(scene: SceneSpec, rng: np.random.Generator) -> list[str]:
    """Several true captions of `scene` (see `scene_prompts`)."""
    return [prompt_text(p) for p in scene_prompts(scene, rng)]


# ---- GenEval-style prompts ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    spec: PromptSpec
    category: str


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[rng.integers(len(items))]


def geneval_prompt(
    rng: np.random.Generator,
    category: str,
    allowed: Callable[[str, str], bool] | None = None,
) -> Prompt:
    """One random prompt of a GenEval `category`; coloured objects use pairs `allowed` accepts."""
    allowed = allowed or (lambda s, c: True)
    combos = [(s, c) for s in SHAPES for c in COLORS if allowed(s, c)]
    two_shapes = [str(s) for s in rng.permutation(SHAPES)[:2]]
    if category == "single_object":
        qs, rels = (ObjectQuery(_pick(rng, SHAPES)),), ()
    elif category == "two_object":
        qs, rels = tuple(ObjectQuery(s) for s in two_shapes), ()
    elif category == "counting":
        qs, rels = (ObjectQuery(_pick(rng, SHAPES), count=int(rng.integers(2, 4)), exact=True),), ()
    elif category == "colors":
        qs, rels = (ObjectQuery(*_pick(rng, combos)),), ()
    elif category == "position":
        qs = tuple(ObjectQuery(s) for s in two_shapes)
        rels = (Relation(0, _pick(rng, tuple(RELATIONS)), 1),)
    elif category == "color_attr":
        first = _pick(rng, combos)
        second = _pick(rng, [sc for sc in combos if sc[0] != first[0]])
        qs, rels = (ObjectQuery(*first), ObjectQuery(*second)), ()
    else:
        raise ValueError(
            f"Unknown GenEval category {category!r}; expected one of {GENEVAL_CATEGORIES}."
        )
    spec = PromptSpec(qs, rels)
    assert geneval_category(spec) == category, (spec, category)
    return Prompt(prompt_text(spec), spec, category)


def geneval_prompts(
    rng: np.random.Generator,
    n: int,
    categories: Sequence[str] = GENEVAL_CATEGORIES,
    allowed: Callable[[str, str], bool] | None = None,
) -> list[Prompt]:
    """`n` random prompts per category, category by category (see `geneval_prompt`)."""
    return [geneval_prompt(rng, c, allowed) for c in categories for _ in range(n)]


def contrast_prompt(prompt: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """`prompt` with every shape and every named colour replaced by others: the same counts,
    sizes, places and relations. Replacements avoid what the prompt names while the family has
    unnamed values left, so "a circle and a square" never becomes "a square and a circle".
    (A negative prompt for CFG that asks for as many objects as `prompt`.)"""

    def swaps(named: list[str], family: Sequence[str]) -> dict[str, str]:
        unused = [str(v) for v in rng.permutation(family) if v not in named]
        out = {}
        for v in dict.fromkeys(named):
            out[v] = unused.pop(0) if unused else _pick(rng, [w for w in family if w != v])
        return out

    shapes = swaps([q.shape for q in prompt.objects], SHAPES)
    colors = swaps([q.color for q in prompt.objects if q.color], tuple(COLORS))
    queries = tuple(
        dataclasses.replace(q, shape=shapes[q.shape], color=colors.get(q.color))
        for q in prompt.objects
    )
    return PromptSpec(queries, prompt.relations)


def scene_for_prompt(
    rng: np.random.Generator,
    prompt: PromptSpec,
    allowed: Callable[[str, str], bool] | None = None,
    max_tries: int = 1000,
) -> SceneSpec:
    """A random scene satisfying `prompt` holding only the objects it asks for.

    Unstated attributes are random (colours among pairs `allowed` accepts); raises if no scene of
    at most three objects satisfies the prompt within `max_tries` draws.
    """
    allowed = allowed or (lambda s, c: True)
    n = sum(q.count for q in prompt.objects)
    if n > MAX_OBJECTS:
        raise ValueError(f"{prompt} asks for {n} objects; a scene holds at most {MAX_OBJECTS}.")
    for _ in range(max_tries):
        free = [(r, c) for r in ROWS for c in COLS]
        objects = []
        for q in prompt.objects:
            for _ in range(q.count):
                cells = [rc for rc in free if q.row in (None, rc[0]) and q.col in (None, rc[1])]
                colors = (
                    [c for c in COLORS if allowed(q.shape, c)] if q.color is None else [q.color]
                )
                if not cells or not colors:
                    break
                row, col = _pick(rng, cells)
                free.remove((row, col))
                size = q.size or _pick(rng, tuple(SIZES))
                objects.append(ObjectSpec(q.shape, _pick(rng, colors), size, row, col))
        if len(objects) == n:
            scene = SceneSpec(tuple(objects), _pick(rng, tuple(BACKGROUNDS)))
            if prompt.satisfied_by(scene):
                return scene
    raise ValueError(f"Found no scene satisfying {prompt_text(prompt)!r} in {max_tries} draws.")
