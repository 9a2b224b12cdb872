"""The story and edit checks of `eval.pretzel_tasks` on the data's own stories (scenes as the
renderer drew them, so a perfect judge): every true story matches, and one wrong object, a
narration the scene cannot have, or a caption the first image breaks fails at that image."""

from __future__ import annotations

import json
import types

import numpy as np

from pretzel_jax.data.shapes.grammar import tokenize
from pretzel_jax.data.shapes.scene import SHAPES, SceneSpec
from pretzel_jax.data.shapes.tasks import Edit, edit_record, interleaved_record
from pretzel_jax.eval import pretzel_tasks


def _story(i: int):
    """(caption, scenes, narrations as words) of one held-out story record."""
    record = interleaved_record(f"s{i}", np.random.default_rng(i), heldout=True)
    scenes = [SceneSpec.from_dict(s) for s in json.loads(record["scene"])["images"]]
    texts = [t for t in record["segments"]["text"] if t]
    return texts[0], scenes, [tokenize(t) for t in texts[1:]]


def test_true_stories_match_and_one_wrong_object_does_not():
    for i in range(20):
        caption, scenes, narrations = _story(i)
        assert pretzel_tasks.story_matches(caption, scenes, narrations, tokenize) == [True] * len(
            scenes
        )
        # The last image with one object recoloured: that image alone fails.
        last = scenes[-1]
        if last.objects:
            o = last.objects[0]
            other = next(c for c in ("red", "blue") if c != o.color)
            wrong = SceneSpec((o.replace(color=other), *last.objects[1:]), last.background)
            got = pretzel_tasks.story_matches(caption, [*scenes[:-1], wrong], narrations, tokenize)
            assert got == [True] * (len(scenes) - 1) + [False]


def test_narrations_and_captions_that_do_not_fit_fail():
    caption, scenes, narrations = _story(3)
    bad = [tokenize("now the purple star sings."), *narrations[1:]]
    assert pretzel_tasks.story_matches(caption, scenes, bad, tokenize)[1] is False
    absent = next(s for s in SHAPES if all(o.shape != s for o in scenes[0].objects))
    assert pretzel_tasks.story_matches(f"a {absent}.", scenes, narrations, tokenize)[0] is False
    assert pretzel_tasks.story_matches("not a caption", scenes, narrations, tokenize)[0] is False


def test_every_record_edit_is_a_candidate_of_its_source():
    for i in range(30):
        meta = json.loads(edit_record(f"e{i}", np.random.default_rng(i))["scene"])
        source, target = (SceneSpec.from_dict(s) for s in meta["images"])
        assert Edit.from_dict(meta["edit"]) in set(pretzel_tasks.candidate_edits(source))
        narrated = Edit.from_dict(meta["edit"]).text(source, narrated=True)
        assert target in pretzel_tasks.narrated_scenes(source, tokenize(narrated), tokenize)


def test_split_story_reads_the_text_between_images():
    lay = types.SimpleNamespace(image_id=9, pad_id=0, vision_start_id=7, vision_end_id=8)
    tokens = [9, 9, 8, 1, 2, 7, 9, 9, 8, 3, 7, 9, 9, 8, 4, 0]
    assert pretzel_tasks._split_story(tokens, lay) == (3, [[1, 2], [3]])
