"""Shapes task records: schema, VQA answers true to the scene, edits change just what they say."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from pretzel_jax.data import schema
from pretzel_jax.data.shapes import SceneSpec
from pretzel_jax.data.shapes.grammar import RELATIONS, parse_caption
from pretzel_jax.data.shapes.scene import BACKGROUNDS, COLORS, COLS, ROWS
from pretzel_jax.data.shapes.tasks import (
    EDIT_OPS,
    QUESTION_TYPES,
    TASK_GENERATORS,
    WORDS,
    Edit,
)
from pretzel_jax.data.tokenizer import split_words

SIZE = 32
CELL = {"center": ("middle", "center")} | {f"{r} {c}": (r, c) for r in ROWS for c in COLS}


def records(task: str, n: int, seed: int = 0, heldout: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [TASK_GENERATORS[task](f"{task}-{i}", rng, SIZE, heldout) for i in range(n)]


def scenes_of(record: dict) -> list[SceneSpec]:
    return [SceneSpec.from_dict(d) for d in json.loads(record["scene"])["images"]]


def images_of(record: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(png))) for png in record["images"]]


def texts_of(record: dict) -> list[str]:
    return [t for t, k in zip(*(record["segments"][f] for f in ("text", "kind"))) if k == 0]


def resolve(scene: SceneSpec, ref: str):
    """The one object a reference ("large red circle at the top left") names; fails if not one."""
    query = parse_caption("a " + ref).objects[0]
    (obj,) = [o for o in scene.objects if query.matches(o)]
    return obj


def cell_pixels(cell: tuple[int, int]) -> np.ndarray:
    """Pixels that touch `cell` (a boundary pixel belongs to both neighbours)."""
    edges = [SIZE * i / 3 for i in range(4)]
    mask = np.zeros((SIZE, SIZE), bool)
    (r, c) = cell
    rows = slice(math.floor(edges[r]), math.ceil(edges[r + 1]))
    cols = slice(math.floor(edges[c]), math.ceil(edges[c + 1]))
    mask[rows, cols] = True
    return mask


@pytest.mark.parametrize("task", sorted(TASK_GENERATORS))
def test_records_follow_the_schema_and_are_deterministic(task):
    expected_task = {"caption": "caption", "vqa": "vqa", "interleaved": "interleaved"}
    a, b = records(task, 6, seed=1), records(task, 6, seed=1)
    for ra, rb in zip(a, b):
        assert ra["task"] == expected_task.get(task, "edit")
        assert json.dumps(ra, sort_keys=True, default=repr) == json.dumps(
            rb, sort_keys=True, default=repr
        )
        seg = ra["segments"]
        kinds, roles, targets = (np.asarray(seg[k]) for k in ("kind", "role", "target"))
        assert len(ra["images"]) == len(scenes_of(ra)) == int((kinds == 1).sum())
        for image in images_of(ra):
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        for text in texts_of(ra):
            assert set(split_words(text)) <= WORDS, text
        if task == "caption":
            assert kinds.tolist() == [0, 1] and targets.tolist() == [False, True]
            captions = json.loads(ra["scene"])["captions"]
            assert captions[0] == texts_of(ra)[0]
            assert all(parse_caption(c).satisfied_by(scenes_of(ra)[0]) for c in captions)
        elif task == "vqa":
            assert kinds[0] == 1 and roles[0] == schema.ROLE_USER and not targets[0]
            assert roles[1::2].tolist() == [schema.ROLE_USER] * (len(kinds) // 2)
            assert roles[2::2].tolist() == [schema.ROLE_ASSISTANT] * (len(kinds) // 2)
            assert targets[2::2].all() and not targets[1::2].any()
        elif task == "interleaved":
            assert 2 <= len(ra["images"]) <= 4
            assert kinds.tolist() == [0, 1] * len(ra["images"]) and targets.all()
            assert (roles == schema.ROLE_NONE).all()
        else:
            assert kinds.tolist() == [1, 0, 1] and targets.tolist() == [False, False, True]


def check_answer(scene: SceneSpec, question: str, answer: str) -> str:
    """Answers `question` about `scene` independently of the generator; returns its type."""
    numbers = ("zero", "one", "two", "three")
    if m := re.fullmatch(r"what color is the (.+)\?", question):
        assert answer == resolve(scene, m[1]).color
        return "color"
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (obj,) = [o for o in scene.objects if o.color == m[1]]
        assert answer == obj.shape
        return "shape"
    if m := re.fullmatch(r"what shape is the object at the (.+)\?", question):
        assert answer == scene.at(*CELL[m[1]]).shape
        return "shape"
    if m := re.fullmatch(r"how many (\w+ )?(\w+) are there\?", question):
        attr, noun = (m[1] or "").strip(), m[2]
        n = sum(
            (noun == "objects" or o.shape + "s" == noun) and attr in ("", o.color)
            for o in scene.objects
        )
        assert answer == numbers[n]
        return "count"
    if m := re.fullmatch(r"where is the (.+)\?", question):
        obj = resolve(scene, m[1])
        assert CELL[answer] == (obj.row, obj.col)
        return "position"
    if m := re.fullmatch(r"is there (an? .+)\?", question):
        assert answer == ("yes" if parse_caption(m[1]).satisfied_by(scene) else "no")
        return "yes_no"
    if m := re.fullmatch(
        r"is the (.+) (to the left of|to the right of|above|below) the (.+)\?", question
    ):
        name = m[2].removeprefix("to the ")
        holds = RELATIONS[name][1]
        a, b = resolve(scene, m[1]), resolve(scene, m[3])
        assert answer == ("yes" if holds(a, b) else "no")
        return "yes_no"
    raise AssertionError(f"unknown question form {question!r}")


def test_vqa_answers_are_true_to_the_scene():
    seen_types, yes_no = set(), set()
    for record in records("vqa", 150, seed=2):
        (scene,) = scenes_of(record)
        qas = json.loads(record["scene"])["qa"]
        texts = texts_of(record)
        assert texts == [x for qa in qas for x in (qa["question"], qa["answer"])]
        assert len({qa["question"] for qa in qas}) == len(qas) == 3
        for qa in qas:
            assert check_answer(scene, qa["question"], qa["answer"]) == qa["type"]
            seen_types.add(qa["type"])
            if qa["type"] == "yes_no":
                yes_no.add(qa["answer"])
    assert seen_types == set(QUESTION_TYPES) and yes_no == {"yes", "no"}


def check_edit(source: SceneSpec, text: str, target: SceneSpec) -> tuple[str, list]:
    """Applies instruction `text` to `source` independently; returns (op, cells it may change)."""
    m = re.fullmatch(r"(?:make|now) the (.+?) (?:turns )?(\w+)\.", text)
    if m and m[2] in COLORS:
        obj = resolve(source, m[1])
        want = [o for o in source.objects if o != obj] + [obj.replace(color=m[2])]
        assert target == SceneSpec(tuple(want), source.background)
        return "recolor", [obj.cell]
    if m := re.fullmatch(r"(?:now the (.+) moves|move the (.+)) to the (.+)\.", text):
        obj = resolve(source, m[1] or m[2])
        row, col = CELL[m[3]]
        want = [o for o in source.objects if o != obj] + [obj.replace(row=row, col=col)]
        assert target == SceneSpec(tuple(want), source.background)
        return "move", [obj.cell, target.at(row, col).cell]
    if m := re.fullmatch(r"(?:add|now) (an? .+ at the .+?)(?: appears)?\.", text):
        text = m[1].replace(" appears", "")
        (query,) = parse_caption(text).objects
        (new,) = set(target.objects) - set(source.objects)
        assert set(source.objects) < set(target.objects) and query.matches(new)
        assert query.size and query.color and query.row
        return "add", [new.cell]
    if m := re.fullmatch(r"(?:remove the (.+)|now the (.+) disappears)\.", text):
        obj = resolve(source, m[1] or m[2])
        assert target == SceneSpec(tuple(o for o in source.objects if o != obj), source.background)
        return "remove", [obj.cell]
    raise AssertionError(f"unknown instruction {text!r}")


def check_pixels(source_image, target_image, op, cells, target: SceneSpec) -> None:
    """Pixels change only in `cells`; each shows its target object's exact colour, or none."""
    allowed = np.zeros((SIZE, SIZE), bool)
    for cell in cells:
        allowed |= cell_pixels(cell)
    differs = np.any(source_image != target_image, axis=-1)
    assert differs.any() and not (differs & ~allowed).any(), op
    for cell in cells:
        region = target_image[cell_pixels(cell)].reshape(-1, 3)
        shows = {name for name, rgb in COLORS.items() if (region == rgb).all(-1).any()}
        obj = target.at(ROWS[cell[0]], COLS[cell[1]])
        assert shows == ({obj.color} if obj else set()), (op, obj, shows)


def test_edits_change_exactly_what_they_say():
    ops = set()
    for record in records("edit", 120, seed=3):
        source, target = scenes_of(record)
        (text,) = texts_of(record)
        edit = Edit.from_dict(json.loads(record["scene"])["edit"])
        assert edit.apply(source) == target
        op, cells = check_edit(source, text, target)
        assert op == edit.op
        ops.add(op)
        check_pixels(*images_of(record), op, cells, target)
    assert ops == set(EDIT_OPS)


def test_interleaved_stories_follow_their_text():
    for record in records("interleaved", 60, seed=4):
        scenes, images, texts = scenes_of(record), images_of(record), texts_of(record)
        assert parse_caption(texts[0].removesuffix(".")).satisfied_by(scenes[0])
        for i in range(1, len(scenes)):
            assert texts[i].startswith("now ")
            op, cells = check_edit(scenes[i - 1], texts[i], scenes[i])
            check_pixels(images[i - 1], images[i], op, cells, scenes[i])


@pytest.mark.parametrize("task", sorted(TASK_GENERATORS))
def test_heldout_combos_only_in_heldout_records(task):
    for record in records(task, 25, seed=5):
        assert not any(s.has_heldout_combo() for s in scenes_of(record))
    for record in records(task, 25, seed=6, heldout=True):
        assert all(s.has_heldout_combo() for s in scenes_of(record))


def test_backgrounds_are_never_object_colours():
    for base, amplitude in BACKGROUNDS.values():
        for rgb in COLORS.values():
            assert np.abs(np.subtract(base, rgb)).max() > 3 * amplitude + 20
