"""The shapes TFDS builder: tiny builds read back through `tfds.data_source` with the schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pretzel_jax.data import schema
from pretzel_jax.data.shapes import SceneSpec
from pretzel_jax.data.shapes.builder import (
    PREPARERS,
    SPLITS,
    TINY,
    ShapesConfig,
    prepare,
    tokenizer_dir,
)
from pretzel_jax.data.tokenizer import UNK_ID, load_word_tokenizer

CONFIGS = {"captions": "caption", "vqa": "vqa", "interleaved": "interleaved", "edits": "edit"}


def read(data_dir: str, config: str, split: str) -> dict[str, schema.Document]:
    source = tfds.data_source(f"shapes/{config}", data_dir=data_dir, split=split)
    docs = [schema.decode_record(source[i]) for i in range(len(source))]
    by_id = {d.id: d for d in docs}
    assert len(by_id) == len(docs)
    return by_id


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    for name in CONFIGS:
        prepare(path, f"{name}_tiny")
    return path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_builds_read_back_with_the_schema(data_dir, name):
    tok = load_word_tokenizer(tokenizer_dir(data_dir, f"{name}_tiny"))
    for split in SPLITS:
        docs = read(data_dir, f"{name}_tiny", split)
        assert sorted(docs) == [f"scene-{split}-{i:06d}" for i in range(TINY[f"num_{split}"])]
        for doc in docs.values():
            assert doc.task == CONFIGS[name]
            scenes = [SceneSpec.from_dict(d) for d in json.loads(doc.scene)["images"]]
            assert len(scenes) == len(doc.images) >= 1
            for image in doc.images:
                assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            # The held-out rule, per image: only heldout scenes hold a held-out (shape, colour).
            assert all(s.has_heldout_combo() == (split == "heldout") for s in scenes)
            # The saved tokenizer knows every word of every text.
            for seg in doc.segments:
                if seg.kind == schema.KIND_TEXT:
                    assert UNK_ID not in tok.encode(seg.text).ids, seg.text


def test_builds_are_deterministic(data_dir, tmp_path):
    prepare(str(tmp_path), "edits_tiny")
    a = read(data_dir, "edits_tiny", "train")
    b = read(str(tmp_path), "edits_tiny", "train")
    assert a.keys() == b.keys()
    for key, doc in a.items():
        other = b[key]
        assert doc.scene == other.scene
        assert [s.text for s in doc.segments] == [s.text for s in other.segments]
        for x, y in zip(doc.images, other.images, strict=True):
            np.testing.assert_array_equal(x, y)


def test_custom_config_sets_sizes_and_image_size(tmp_path):
    config = ShapesConfig(
        name="vqa_48px", task="vqa", image_size=48, num_train=3, num_validation=1, num_test=1,
        num_heldout=2, seed=3,
    )  # fmt: skip
    prepare(str(tmp_path), config)
    docs = read(str(tmp_path), "vqa_48px", "heldout")
    assert len(docs) == 2
    assert all(d.images[0].shape == (48, 48, 3) for d in docs.values())
    with pytest.raises(ValueError, match="task 'caption_and_vqa'"):
        ShapesConfig(name="bad", task="caption_and_vqa")


def test_preparers_name_every_config():
    assert {f"shapes_{c}" for c in CONFIGS} | {f"shapes_{c}_tiny" for c in CONFIGS} == set(
        PREPARERS
    )
