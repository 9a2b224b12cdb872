"""Per-scene task generators of the shapes family: caption, VQA, interleaved and edit records.

Each generator draws one random scene (or a chain of edited scenes) from `rng`, renders it and
returns the record dict of `pretzel_jax.data.schema` (`make_record`), with the ground truth in the
record's `scene` JSON:

    {"images": [scene dict per image, in order], ...task keys}
    caption:     "captions": [the caption used, other true variants...]
    vqa:         "qa": [{"type", "question", "answer"}...], type in QUESTION_TYPES
    interleaved: "edits": [edit dict between image i and i + 1...]
    edit:        "edit": {"op", "before", "after"} (object dicts; None where add/remove has none)

All images of a record are rendered from one seed, so unchanged objects keep their exact pixels
from image to image: an edit changes only the cells it names.

`heldout=True` draws scenes for the held-out split (every image holds a `HELDOUT_COMBOS` pair);
otherwise no image holds one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from pretzel_jax.data import schema
from pretzel_jax.data.schema import ROLE_ASSISTANT, ROLE_USER, Segment
from pretzel_jax.data.shapes.grammar import (
    GRAMMAR_WORDS,
    NUMERALS,
    PLURALS,
    RELATIONS,
    cell_phrase,
    scene_captions,
    tokenize,
)
from pretzel_jax.data.shapes.render import render
from pretzel_jax.data.shapes.scene import (
    COLORS,
    MAX_OBJECTS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    is_seen_combo,
    random_heldout_scene,
    random_object,
    random_scene,
)

QUESTION_TYPES = ("color", "shape", "count", "position", "yes_no")
EDIT_OPS = ("recolor", "move", "add", "remove")

# Fixed words of the task templates (the grammar's words cover shapes, colours, cells, numbers).
TEMPLATE_WORDS = frozenset(
    tokenize(
        "what color is the shape object objects how many are there where yes no ? . "
        "make move to add remove now turns moves appears disappears"
    )
)
WORDS: frozenset[str] = GRAMMAR_WORDS | TEMPLATE_WORDS


def cell_words(row: str, col: str) -> str:
    """ "top left", "middle right", "center" (the middle-center cell)."""
    return " ".join(cell_phrase(row, col)[2:])


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


# ---- Referring to an object --------------------------------------------------------------------


def refer(scene: SceneSpec, obj: ObjectSpec, use_color: bool = True) -> str:
    """The shortest phrase naming `obj` uniquely in `scene`: "circle", "red circle",
    "large red circle", or else with its cell, "red circle at the top left"."""
    tries = [(obj.shape,), (obj.color, obj.shape), (obj.size, obj.color, obj.shape)]
    if not use_color:
        tries = [(obj.shape,), (obj.size, obj.shape)]
    for words in tries:
        same = [o for o in scene.objects if _described(o, words)]
        if same == [obj]:
            return " ".join(words)
    return " ".join([*tries[-1], *cell_phrase(obj.row, obj.col)])


def _described(o: ObjectSpec, words: tuple[str, ...]) -> bool:
    return set(words) <= {o.shape, o.color, o.size}


# ---- VQA ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str


def _pick(rng: np.random.Generator, items):
    return items[rng.integers(len(items))]


def ask(scene: SceneSpec, rng: np.random.Generator, qtype: str) -> QA:
    """A random question of type `qtype` about `scene`, with its exact answer."""
    o = _pick(rng, scene.objects)
    if qtype == "color":
        q = f"what color is the {refer(scene, o, use_color=False)}?"
        return QA(qtype, q, o.color)
    if qtype == "shape":
        if sum(x.color == o.color for x in scene.objects) == 1:
            q = f"what shape is the {o.color} object?"
        else:
            q = f"what shape is the object {' '.join(cell_phrase(o.row, o.col))}?"
        return QA(qtype, q, o.shape)
    if qtype == "count":
        kind = rng.integers(3)
        if kind == 0:  # any shape, possibly absent (answer "zero")
            shape = _pick(rng, SHAPES)
            n = sum(x.shape == shape for x in scene.objects)
            return QA(qtype, f"how many {PLURALS[shape]} are there?", NUMERALS[n])
        if kind == 1:
            n = sum(x.color == o.color for x in scene.objects)
            return QA(qtype, f"how many {o.color} objects are there?", NUMERALS[n])
        return QA(qtype, "how many objects are there?", NUMERALS[len(scene.objects)])
    if qtype == "position":
        return QA(qtype, f"where is the {refer(scene, o)}?", cell_words(o.row, o.col))
    if qtype == "yes_no":
        return _ask_yes_no(scene, rng, o)
    raise ValueError(f"Unknown question type {qtype!r}; expected one of {QUESTION_TYPES}.")


def _ask_yes_no(scene: SceneSpec, rng: np.random.Generator, o: ObjectSpec) -> QA:
    kind = rng.integers(3) if len(scene.objects) > 1 else rng.integers(2)
    want_yes = rng.random() < 0.5
    if kind == 0:  # "is there a red circle?"
        present = {x.combo for x in scene.objects}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        shape, color = o.combo if want_yes else _pick(rng, absent)
        q = f"is there {_article(f'{color} {shape}')}?"
        answer = (shape, color) in present
    elif kind == 1:  # "is there a circle at the top left?"
        shape = o.shape if want_yes else _pick(rng, [s for s in SHAPES if s != o.shape])
        row, col = (o.row, o.col) if rng.random() < 0.5 else _pick(rng, scene.free_cells())
        at = scene.at(row, col)
        q = f"is there {_article(shape)} {' '.join(cell_phrase(row, col))}?"
        answer = at is not None and at.shape == shape
    else:  # "is the red circle to the left of the square?"
        b = _pick(rng, [x for x in scene.objects if x is not o])
        name = _pick(rng, tuple(RELATIONS))
        words, holds = RELATIONS[name]
        q = f"is the {refer(scene, o)} {' '.join(words)} the {refer(scene, b)}?"
        answer = holds(o, b)
    return QA("yes_no", q, "yes" if answer else "no")


def ask_many(scene: SceneSpec, rng: np.random.Generator, n: int) -> list[QA]:
    """`n` distinct questions (types drawn in turn from a random order of QUESTION_TYPES)."""
    types = [str(t) for t in rng.permutation(QUESTION_TYPES)]
    out: list[QA] = []
    for i in range(100 * n):
        if len(out) == n:
            break
        qa = ask(scene, rng, types[i % len(types)])
        if all(qa.question != x.question for x in out):
            out.append(qa)
    return out


def qa_segments(qas: list[QA]) -> list[Segment]:
    """Per question: the question (user), then its answer (assistant, target)."""
    out = []
    for qa in qas:
        out.append(Segment.of_text(qa.question, role=ROLE_USER))
        out.append(Segment.of_text(qa.answer, role=ROLE_ASSISTANT, target=True))
    return out


# ---- Edits -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Edit:
    """One change to a scene: `before` becomes `after` (add: before None; remove: after None)."""

    op: str
    before: ObjectSpec | None
    after: ObjectSpec | None

    def apply(self, scene: SceneSpec) -> SceneSpec:
        objects = [o for o in scene.objects if o != self.before]
        if self.before is not None and len(objects) == len(scene.objects):
            raise ValueError(f"{self} does not apply: {self.before} is not in {scene}.")
        if self.after is not None:
            objects.append(self.after)
        return SceneSpec(tuple(objects), scene.background)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "before": self.before and self.before.to_dict(),
            "after": self.after and self.after.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Edit:
        side = lambda x: None if x is None else ObjectSpec.from_dict(x)
        return cls(d["op"], side(d["before"]), side(d["after"]))

    def text(self, scene: SceneSpec, narrated: bool = False) -> str:
        """The instruction ("make the circle blue.") or, narrated, the story line ("now the circle
        turns blue."), naming objects as they are in the source `scene`."""
        o, new = self.before, self.after
        if self.op == "add":
            thing = _article(f"{new.size} {new.color} {new.shape}")
            at = " ".join(cell_phrase(new.row, new.col))
            return f"now {thing} appears {at}." if narrated else f"add {thing} {at}."
        ref = refer(scene, o)
        if self.op == "recolor":
            return (
                f"now the {ref} turns {new.color}." if narrated else f"make the {ref} {new.color}."
            )
        if self.op == "move":
            to = f"to the {cell_words(new.row, new.col)}"
            return f"now the {ref} moves {to}." if narrated else f"move the {ref} {to}."
        if self.op == "remove":
            return f"now the {ref} disappears." if narrated else f"remove the {ref}."
        raise ValueError(f"Unknown edit op {self.op!r}; expected one of {EDIT_OPS}.")


def random_edit(
    rng: np.random.Generator,
    scene: SceneSpec,
    allowed: Callable[[str, str], bool],
    keep: Callable[[SceneSpec], bool],
    ops: tuple[str, ...] = EDIT_OPS,
    max_tries: int = 100,
) -> Edit:
    """A random edit among `ops` whose new objects' (shape, colour) pairs are `allowed` and whose
    result satisfies `keep` (e.g. the split's held-out rule)."""
    for _ in range(max_tries):
        free, n = scene.free_cells(), len(scene.objects)
        feasible = [
            op
            for op in ops
            if op == "recolor"
            or (op == "move" and free)
            or (op == "add" and free and n < MAX_OBJECTS)
            or (op == "remove" and n > 1)
        ]
        op = _pick(rng, feasible)
        o = _pick(rng, scene.objects)
        if op == "recolor":
            colors = [c for c in COLORS if c != o.color and allowed(o.shape, c)]
            if not colors:
                continue
            edit = Edit(op, o, o.replace(color=_pick(rng, colors)))
        elif op == "move":
            row, col = _pick(rng, scene.free_cells())
            edit = Edit(op, o, o.replace(row=row, col=col))
        elif op == "add":
            row, col = _pick(rng, scene.free_cells())
            edit = Edit(op, None, random_object(rng, row, col, allowed))
        else:
            edit = Edit(op, o, None)
        if keep(edit.apply(scene)):
            return edit
    raise ValueError(f"No edit among {ops} of {scene} keeps the split's rule in {max_tries} tries.")


# ---- Records -----------------------------------------------------------------------------------


def _split_rules(heldout: bool):
    """(first scene sampler, allowed pairs for new objects, rule every scene must keep)."""
    if heldout:
        return random_heldout_scene, (lambda s, c: True), SceneSpec.has_heldout_combo
    return random_scene, is_seen_combo, lambda s: not s.has_heldout_combo()


def _images(scenes: list[SceneSpec], rng: np.random.Generator, size: int) -> list[np.ndarray]:
    seed = int(rng.integers(2**63))
    return [render(s, size, np.random.default_rng(seed)) for s in scenes]


def _scene_json(scenes: list[SceneSpec], **extra: Any) -> str:
    return json.dumps({"images": [s.to_dict() for s in scenes], **extra}, sort_keys=True)


def caption_record(
    record_id: str, rng: np.random.Generator, image_size: int = 32, heldout: bool = False
) -> dict[str, Any]:
    """[caption (text), image (target)]; all true caption variants in the scene JSON."""
    scene = _split_rules(heldout)[0](rng)
    captions = scene_captions(scene, rng)
    main = captions[rng.integers(len(captions))]
    captions = [main, *(c for c in captions if c != main)]
    (image,) = _images([scene], rng, image_size)
    segments = [Segment.of_text(main), Segment.of_image(image, target=True)]
    return schema.make_record(
        record_id, "caption", segments, scene=_scene_json([scene], captions=captions)
    )


def vqa_record(
    record_id: str,
    rng: np.random.Generator,
    image_size: int = 32,
    heldout: bool = False,
    num_questions: int = 3,
) -> dict[str, Any]:
    """[image (user), then per question: question (user), answer (assistant, target)]."""
    scene = _split_rules(heldout)[0](rng)
    qas = ask_many(scene, rng, num_questions)
    (image,) = _images([scene], rng, image_size)
    segments = [Segment.of_image(image, role=ROLE_USER), *qa_segments(qas)]
    qa_json = [dataclasses.asdict(qa) for qa in qas]
    return schema.make_record(record_id, "vqa", segments, scene=_scene_json([scene], qa=qa_json))


def interleaved_record(
    record_id: str,
    rng: np.random.Generator,
    image_size: int = 32,
    heldout: bool = False,
    num_images: int | None = None,
) -> dict[str, Any]:
    """A story: caption, image, then per change "now ..." and the changed image (2-4 images)."""
    first, allowed, keep = _split_rules(heldout)
    n = int(rng.integers(2, 5)) if num_images is None else num_images
    scenes = [first(rng)]
    texts = [_pick(rng, scene_captions(scenes[0], rng)) + "."]
    edits = []
    for _ in range(n - 1):
        edit = random_edit(rng, scenes[-1], allowed, keep)
        texts.append(edit.text(scenes[-1], narrated=True))
        scenes.append(edit.apply(scenes[-1]))
        edits.append(edit.to_dict())
    segments = []
    for text, image in zip(texts, _images(scenes, rng, image_size), strict=True):
        segments += [Segment.of_text(text, target=True), Segment.of_image(image, target=True)]
    return schema.make_record(
        record_id, "interleaved", segments, scene=_scene_json(scenes, edits=edits)
    )


def edit_record(
    record_id: str, rng: np.random.Generator, image_size: int = 32, heldout: bool = False
) -> dict[str, Any]:
    """[source image, instruction, target image (target)]."""
    first, allowed, keep = _split_rules(heldout)
    source = first(rng)
    edit = random_edit(rng, source, allowed, keep)
    target = edit.apply(source)
    src_image, tgt_image = _images([source, target], rng, image_size)
    segments = [
        Segment.of_image(src_image),
        Segment.of_text(edit.text(source)),
        Segment.of_image(tgt_image, target=True),
    ]
    return schema.make_record(
        record_id, "edit", segments, scene=_scene_json([source, target], edit=edit.to_dict())
    )


TASK_GENERATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "caption": caption_record,
    "vqa": vqa_record,
    "interleaved": interleaved_record,
    "edit": edit_record,
}
