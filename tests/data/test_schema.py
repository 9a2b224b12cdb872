"""The shared record schema: make_record -> TFDS builder (array_record, no TF) -> decode_record."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from pretzel_jax.data import schema
from pretzel_jax.data.schema import (
    KIND_IMAGE,
    KIND_TEXT,
    ROLE_ASSISTANT,
    ROLE_NONE,
    ROLE_USER,
    Document,
    RecordError,
    Segment,
    decode_record,
    make_record,
)


def image(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def documents() -> list[Document]:
    return [
        Document(
            "scene-000000",
            "caption",
            (Segment.of_text("a red circle"), Segment.of_image(image(0), target=True)),
            scene='{"captions": ["a red circle", "one red circle"]}',
        ),
        Document(
            "scene-000001",
            "vqa",
            (
                Segment.of_image(image(1, 6, 10), role=ROLE_USER),
                Segment.of_text("what colour ?", role=ROLE_USER),
                Segment.of_text("blue", role=ROLE_ASSISTANT, target=True),
                Segment.of_text("how many ?", role=ROLE_USER),
                Segment.of_text("two", role=ROLE_ASSISTANT, target=True),
            ),
        ),
        Document(
            "doc.jsonl:3",
            "interleaved",
            (
                Segment.of_text("a scene", target=True),
                Segment.of_image(image(2), target=True),
                Segment.of_text("now the circle turns blue ünïcode", target=True),
                Segment.of_image(image(3, 12, 4), target=True),
            ),
        ),
        Document("t:0", "text", (Segment.of_text("", target=True),)),
    ]


class TinyDocs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "tiny_docs"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=schema.features())

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        for doc in documents():
            yield doc.id, make_record(doc.id, doc.task, doc.segments, scene=doc.scene)


def assert_same_document(a: Document, b: Document) -> None:
    assert (a.id, a.task, a.scene, len(a.segments)) == (b.id, b.task, b.scene, len(b.segments))
    for x, y in zip(a.segments, b.segments, strict=True):
        assert (x.kind, x.text, x.role, x.target) == (y.kind, y.text, y.role, y.target)
        if x.kind == KIND_IMAGE:
            assert y.image.dtype == np.uint8
            np.testing.assert_array_equal(x.image, y.image)
        else:
            assert x.image is None and y.image is None


def test_round_trip_through_tfds_data_source(tmp_path):
    TinyDocs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = tfds.data_source("tiny_docs", data_dir=str(tmp_path), split="train")
    by_id = {d.id: d for d in documents()}
    got = [decode_record(source[i]) for i in range(len(source))]
    assert sorted(d.id for d in got) == sorted(by_id)  # records are shuffled on write
    for doc in got:
        assert_same_document(by_id[doc.id], doc)
        assert [im.shape for im in doc.images] == [im.shape for im in by_id[doc.id].images]


def test_images_given_separately_match_inline():
    doc = documents()[2]
    bare = [Segment(s.kind, s.text, None, s.role, s.target) for s in doc.segments]
    separate = make_record(doc.id, doc.task, bare, images=doc.images)
    inline = make_record(doc.id, doc.task, doc.segments)
    assert separate == inline
    assert list(inline["segments"]["image"]) == [-1, 0, -1, 1]
    assert list(inline["segments"]["kind"]) == [KIND_TEXT, KIND_IMAGE, KIND_TEXT, KIND_IMAGE]
    assert inline["segments"]["role"] == [ROLE_NONE] * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(task="story"), r"'bad:7'.*task 'story'"),
        (dict(segments=[]), r"'bad:7'.*no segments"),
        (dict(segments=[Segment(5, "x")]), r"'bad:7'.*segment 0: kind 5"),
        (dict(segments=[Segment.of_text("x", role=9)]), r"segment 0: role 9"),
        (dict(segments=[Segment(KIND_IMAGE)]), r"image segment has no image"),
        (dict(segments=[Segment(KIND_IMAGE)], images=[]), r"1 image segments but 0 images"),
        (dict(segments=[Segment.of_image(image(0))], images=[image(1)]), r"both inline"),
        (dict(segments=[Segment.of_image(np.zeros((4, 4), np.uint8))]), r"image 0 must be uint8"),
        (dict(segments=[Segment.of_image(image(0).astype(np.float32))]), r"image 0 must be uint8"),
        (dict(segments=[Segment(KIND_IMAGE, "x", image(0))]), r"segment 0: an image segment has"),
    ],
)
def test_bad_records_name_the_record_and_field(kwargs, match):
    args = dict(id="bad:7", task="caption", segments=[Segment.of_text("x")])
    args.update(kwargs)
    with pytest.raises(RecordError, match=match):
        make_record(**args)


def test_decode_rejects_dangling_image_index():
    record = make_record("r:1", "caption", [Segment.of_image(image(0))])
    record["segments"]["image"] = [3]
    record["images"] = [image(0)]
    with pytest.raises(RecordError, match=r"'r:1'.*segment 0 points at image 3.*1 images"):
        decode_record(record)
