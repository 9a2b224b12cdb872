"""Shapes captions: round trip through the parser, truth on the scene, errors, GenEval prompts."""

from __future__ import annotations

import numpy as np
import pytest

from pretzel_jax.data.shapes import ObjectSpec, SceneSpec, random_scene
from pretzel_jax.data.shapes.grammar import (
    GENEVAL_CATEGORIES,
    GRAMMAR_WORDS,
    CaptionParseError,
    ObjectQuery,
    PromptSpec,
    Relation,
    contrast_prompt,
    geneval_category,
    geneval_prompts,
    parse_caption,
    prompt_text,
    scene_captions,
    scene_for_prompt,
    scene_prompts,
    tokenize,
)
from pretzel_jax.data.shapes.scene import COLORS


def scene(*objects: tuple[str, str, str, str, str]) -> SceneSpec:
    return SceneSpec(tuple(ObjectSpec(*o) for o in objects), "white")


def test_every_caption_parses_back_to_a_spec_the_scene_satisfies():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(400):
        s = random_scene(rng)
        prompts = scene_prompts(s, rng)
        captions = scene_captions(s, np.random.default_rng(1))
        assert len(captions) == len(set(captions)) >= 3
        for prompt in prompts:
            text = prompt_text(prompt)
            assert set(tokenize(text)) <= GRAMMAR_WORDS
            parsed = parse_caption(text)
            assert parsed == prompt, text
            assert parsed.satisfied_by(s), (text, s)
            kinds.add(geneval_category(parsed))
    # Random scenes' captions cover most GenEval categories (position needs distinct shapes).
    assert {"two_object", "color_attr", "single_object", "colors", "counting"} <= kinds


def test_full_caption_is_false_once_the_scene_changes():
    rng = np.random.default_rng(2)
    for _ in range(100):
        s = random_scene(rng)
        full = parse_caption(scene_captions(s, rng)[0])
        o = s.objects[0]
        other = next(c for c in COLORS if c != o.color)
        recoloured = SceneSpec((o.replace(color=other), *s.objects[1:]), s.background)
        assert not full.satisfied_by(recoloured)
        row, col = s.free_cells()[0]
        moved = SceneSpec((o.replace(row=row, col=col), *s.objects[1:]), s.background)
        assert not full.satisfied_by(moved)


def test_counts_colours_and_relations_mean_what_they_say():
    two_blue_squares = parse_caption("two blue squares")
    assert two_blue_squares == PromptSpec((ObjectQuery("square", "blue", count=2, exact=True),))
    sq = [("square", "blue", "small", "top", c) for c in ("left", "center", "right")]
    assert two_blue_squares.satisfied_by(scene(*sq[:2]))
    assert not two_blue_squares.satisfied_by(scene(*sq))  # three is not two
    assert not two_blue_squares.satisfied_by(
        scene(sq[0], ("square", "red", "small", "top", "right"))
    )
    assert parse_caption("a blue square").satisfied_by(scene(*sq))  # "a": at least one

    left = parse_caption("a green triangle to the left of a yellow circle")
    assert left.relations == (Relation(0, "left of", 1),)
    tri = ("triangle", "green", "large", "bottom", "left")
    assert left.satisfied_by(scene(tri, ("circle", "yellow", "small", "top", "right")))
    assert not left.satisfied_by(scene(tri, ("circle", "yellow", "small", "top", "left")))
    below = parse_caption("a triangle below a circle")
    assert below.satisfied_by(scene(tri, ("circle", "red", "small", "top", "left")))
    assert not below.satisfied_by(scene(("triangle", "red", "small", "top", "center"), sq[0]))

    placed = parse_caption("a large red circle at the center and three squares in the top row")
    assert placed.objects[0] == ObjectQuery("circle", "red", "large", "middle", "center")
    assert placed.objects[1] == ObjectQuery("square", row="top", count=3, exact=True)


def test_equivalent_spellings_parse_alike():
    assert parse_caption("A red circle, a blue square and a square.") == parse_caption(
        "a red circle and a blue square and a square"
    )
    assert parse_caption("an circle at the middle center") == parse_caption(
        "a circle at the center"
    )
    assert parse_caption("a circle in the center column").objects[0].col == "center"


@pytest.mark.parametrize(
    "text, word",
    [
        ("a pink circle", "'pink'"),
        ("two circle", "'circle'"),
        ("a circles", "'circles'"),
        ("a red", "nothing"),
        ("a circle left of a square", "'left'"),
        ("a circle at the top", "nothing"),
        ("red circle", "'red'"),
    ],
)
def test_unparseable_captions_name_the_word(text, word):
    with pytest.raises(CaptionParseError, match=f"Cannot parse caption '{text}'.*{word}"):
        parse_caption(text)


def test_geneval_prompts_have_their_category_and_are_satisfiable():
    rng = np.random.default_rng(3)
    prompts = geneval_prompts(rng, 20)
    assert [p.category for p in prompts] == [c for c in GENEVAL_CATEGORIES for _ in range(20)]
    for p in prompts:
        assert parse_caption(p.text) == p.spec
        assert geneval_category(p.spec) == p.category
        s = scene_for_prompt(rng, p.spec)
        assert p.spec.satisfied_by(s)
        assert PromptSpec.from_dict(p.spec.to_dict()) == p.spec
    examples = {
        "a circle": "single_object",
        "a circle and a square": "two_object",
        "three circles": "counting",
        "a red circle": "colors",
        "a circle above a square": "position",
        "a red circle and a blue square": "color_attr",
        "a large red circle": None,
        "a circle at the top left": None,
    }
    for text, category in examples.items():
        assert geneval_category(parse_caption(text)) == category, text


def test_contrast_prompts_swap_every_shape_and_colour_and_keep_the_rest():
    rng = np.random.default_rng(5)
    for p in geneval_prompts(np.random.default_rng(6), 10):
        c = contrast_prompt(p.spec, rng)
        assert parse_caption(prompt_text(c)) == c and geneval_category(c) == p.category
        assert c.relations == p.spec.relations
        named = {q.shape for q in p.spec.objects} | {q.color for q in p.spec.objects}
        for q, r in zip(p.spec.objects, c.objects, strict=True):
            assert (r.count, r.exact, r.size, r.row, r.col) == (
                q.count,
                q.exact,
                q.size,
                q.row,
                q.col,
            )
            assert r.shape not in named and (r.color is None) == (q.color is None)
            assert r.color is None or r.color not in named
    same = PromptSpec(
        (ObjectQuery("circle", "red"), ObjectQuery("circle", "red", count=2, exact=True))
    )
    c = contrast_prompt(same, rng)  # one name, one replacement
    assert c.objects[0].shape == c.objects[1].shape and c.objects[0].color == c.objects[1].color


def test_geneval_prompts_respect_allowed_combos():
    prompts = geneval_prompts(
        np.random.default_rng(4), 30, ("colors", "color_attr"), allowed=lambda s, c: c == "red"
    )
    assert all(q.color == "red" for p in prompts for q in p.spec.objects)
