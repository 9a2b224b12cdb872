"""The shapes judge: parse accuracy on held-out renders, GenEval scoring, cache and its errors.

One short training run (module fixture) serves every test; the full recipe's numbers come from
`python -m pretzel_jax.eval.shapes_judge --eval`.
"""

import json
import shutil

import numpy as np
import pytest

from pretzel_jax.data.shapes import render
from pretzel_jax.data.shapes.grammar import (
    GENEVAL_CATEGORIES,
    geneval_prompts,
    parse_caption,
    scene_for_prompt,
)
from pretzel_jax.data.shapes.scene import COLORS, ObjectSpec, SceneSpec
from pretzel_jax.eval import shapes_judge as sj

# One judge training serves every test of the file: the file runs in the slow step.
pytestmark = pytest.mark.slow

SHORT = sj.JudgeConfig(steps=300, pool=768)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    judge = sj.train(SHORT, seed=0)
    judge.save(folder)
    return judge, folder


@pytest.fixture(scope="module")
def judge(trained):
    return trained[0]


@pytest.fixture(scope="module")
def heldout():
    rng = np.random.default_rng([sj.EVAL_SEED, 7])
    return sj.render_batch(rng, 256, 32)


def _large(scene: SceneSpec) -> SceneSpec:
    # Scoring tests check the logic, not the hardest attribute (small shapes after a short run).
    return SceneSpec(tuple(o.replace(size="large") for o in scene.objects), scene.background)


def _renders(scenes):
    return np.stack([render(s, 32) for s in scenes])


def test_parse_accuracy_on_heldout_clean_renders(judge, heldout):
    images, scenes = heldout
    acc = sj.attribute_accuracy(judge, images, scenes)
    for name in ("presence", "count", "position", "color", "size"):
        assert acc[name] >= 0.99, (name, acc)
    assert acc["shape"] >= 0.97, acc  # short schedule; the full recipe reaches >= 99.9%


def test_parse_returns_the_rendered_scene(judge, heldout):
    images, scenes = heldout
    large = [_large(s) for s in scenes[:40]]
    parsed = judge.parse(_renders(large))
    assert [p.objects for p in parsed] == [s.objects for s in large]
    assert all(type(p) is SceneSpec for p in parsed)


def test_parse_accuracy_survives_noise_and_blur(judge, heldout):
    images, scenes = heldout
    noisy = sj.degrade(images, noise_std=0.05, blur_sigma=0.75, seed=0)
    acc = sj.attribute_accuracy(judge, noisy, scenes)
    for name in ("presence", "count", "position", "color", "size"):
        assert acc[name] >= 0.98, (name, acc)


def test_score_is_one_for_renders_of_the_prompts_own_spec(judge):
    rng = np.random.default_rng(3)
    prompts = geneval_prompts(rng, 6)
    scenes = [_large(scene_for_prompt(rng, p.spec)) for p in prompts]
    scores = judge.score(_renders(scenes), prompts)
    assert set(scores) == {*GENEVAL_CATEGORIES, "overall"}
    assert scores == {k: 1.0 for k in scores}
    # Caption strings and PromptSpecs score the same.
    assert judge.score(_renders(scenes), [p.text for p in prompts]) == scores
    assert judge.score(_renders(scenes), [p.spec for p in prompts]) == scores


def _recolour(scene: SceneSpec) -> SceneSpec:
    names = list(COLORS)
    return SceneSpec(
        tuple(
            o.replace(color=names[(names.index(o.color) + 1) % len(names)]) for o in scene.objects
        ),
        scene.background,
    )


def test_score_fails_mismatched_images(judge):
    rng = np.random.default_rng(4)
    prompts = geneval_prompts(rng, 6, categories=("colors", "color_attr"))
    scenes = [_recolour(_large(scene_for_prompt(rng, p.spec))) for p in prompts]
    scores = judge.score(_renders(scenes), prompts)
    assert scores == {"colors": 0.0, "color_attr": 0.0, "overall": 0.0}

    # Position: the same two objects, mirrored left-right / top-bottom.
    prompts = geneval_prompts(rng, 6, categories=("position",))
    mirrored = []
    for p in prompts:
        s = _large(scene_for_prompt(rng, p.spec))
        flip = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
        objs = tuple(
            o.replace(row=flip.get(o.row, o.row), col=flip.get(o.col, o.col)) for o in s.objects
        )
        mirrored.append(SceneSpec(objs, s.background))
    assert judge.score(_renders(mirrored), prompts)["position"] == 0.0

    # Counting is exact: one object too many fails.
    spec = parse_caption("two circles")
    three = SceneSpec(
        tuple(ObjectSpec("circle", "red", "large", "top", c) for c in ("left", "center", "right"))
    )
    assert judge.score(_renders([three]), [spec]) == {"counting": 0.0, "overall": 0.0}


def test_richer_captions_score_as_other(judge):
    scene = SceneSpec((ObjectSpec("square", "blue", "large", "bottom", "right"),))
    caption = "a large blue square at the bottom right"
    assert judge.score(_renders([scene]), [caption])["other"] == 1.0
    wrong = "a large blue square at the top left"
    assert judge.score(_renders([scene]), [wrong])["other"] == 0.0


def test_more_objects_than_a_scene_spec_holds_are_all_counted(judge):
    # Two renders on a plain background, overlaid cell-wise: six large circles.
    a, b = (
        SceneSpec(
            tuple(ObjectSpec("circle", "red", "large", r, c) for c in ("left", "center", "right"))
        )
        for r in ("top", "bottom")
    )
    image = np.where(
        (_renders([b]) != render(SceneSpec((), "white"), 32)).any(-1, keepdims=True),
        _renders([b]),
        _renders([a]),
    )
    (parsed,) = judge.parse(image)
    assert isinstance(parsed, sj.ParsedScene) and len(parsed.objects) == 6
    assert not judge.check(image, ["three circles"])[0]
    assert judge.check(image, ["a red circle above a red circle"])[0] is np.True_


def test_cache_round_trip_gives_identical_predictions(trained, heldout):
    judge, folder = trained
    images = heldout[0][:64]
    again = sj.load(folder, train_if_missing=False)
    want, got = judge.predict(images), again.predict(images)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    meta = json.loads((folder / sj.META_FILE).read_text())
    assert meta["data_version"] == sj.data_version() and meta["seed"] == 0
    assert meta["config"]["steps"] == SHORT.steps


def test_load_trains_and_caches_when_missing(trained, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sj, "train", lambda *a, **k: calls.append(1) or trained[0])
    monkeypatch.setenv("PRETZEL_CACHE", str(tmp_path))
    with pytest.raises(sj.JudgeWeightsError, match="No shapes judge weights"):
        sj.load(train_if_missing=False)
    sj.load()
    sj.load()
    assert calls == [1] and (tmp_path / "shapes_judge" / sj.WEIGHTS_FILE).is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "stale_version", "bad_json"])
def test_unusable_weights_raise_one_clear_error(trained, tmp_path, damage):
    folder = tmp_path / "judge"
    shutil.copytree(trained[1], folder)
    weights, meta_file = folder / sj.WEIGHTS_FILE, folder / sj.META_FILE
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "stale_version":
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps(meta | {"data_version": "0123456789abcdef"}))
    else:
        meta_file.write_text("{not json")
    with pytest.raises(sj.JudgeWeightsError) as e:
        sj.load(folder)
    assert str(folder) in str(e.value) and "retrain" in str(e.value)


def test_safetensors_that_do_not_parse_name_the_file(trained, tmp_path):
    folder = tmp_path / "judge"
    shutil.copytree(trained[1], folder)
    weights, meta_file = folder / sj.WEIGHTS_FILE, folder / sj.META_FILE
    weights.write_bytes(b"\xff" * 64)  # checksum made to match: the reader itself must refuse it
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"weights_sha256": sj._sha256(weights)}))
    with pytest.raises(sj.JudgeWeightsError, match="not a readable safetensors file"):
        sj.load(folder)


def test_images_must_be_uint8_batches(judge):
    with pytest.raises(ValueError, match=r"uint8 images of shape \(B, H, W, 3\)"):
        judge.parse(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="one per image"):
        judge.score(np.zeros((2, 32, 32, 3), np.uint8), ["a circle"])


def test_degrade_is_identity_at_zero_strength_and_blur_keeps_the_mean():
    image = render(SceneSpec((ObjectSpec("triangle", "green", "large", "middle", "center"),)), 32)
    assert np.array_equal(sj.degrade(image[None])[0], image)
    blurred = sj.degrade(image[None], blur_sigma=1.5)[0].astype(float)
    assert abs(blurred.mean() - image.mean()) < 0.5
    assert blurred.std() < image.std()
