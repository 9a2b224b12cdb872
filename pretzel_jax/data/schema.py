"""The one TFDS record schema every multimodal builder writes (shapes family and real formats).

A record is a *document*: an ordered list of segments, each a piece of text or a reference to one
of the record's images, plus per-segment chat role and loss-target flags. One layout
(`pretzel_jax.data.layout`) and one pipeline serve every builder because they all write this.

Builders call `make_record(...)` to get the dict to yield; readers call `decode_record(example)`
on what `tfds.data_source` returns to get a plain `Document`.

Task conventions (what the segments look like):
  caption:     [text(caption, ROLE_NONE, target False), image(target True)] (text-to-image order);
               other caption variants go into `scene` JSON under "captions".
  vqa:         [image(ROLE_USER), text(question, ROLE_USER), text(answer, ROLE_ASSISTANT,
               target True)], possibly several question/answer pairs.
  interleaved: alternating text and images, all targets True, ROLE_NONE.
  edit:        [image(source), text(instruction), image(target, target True)].
  text:        text segments only.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

TASKS = ("caption", "vqa", "interleaved", "edit", "text")

KIND_TEXT = 0
KIND_IMAGE = 1
KINDS = (KIND_TEXT, KIND_IMAGE)

ROLE_NONE = 0  # plain document, no chat template
ROLE_USER = 1
ROLE_ASSISTANT = 2
ROLES = (ROLE_NONE, ROLE_USER, ROLE_ASSISTANT)

NO_IMAGE = -1  # "image" index of a text segment


def features() -> tfds.features.FeaturesDict:
    """A fresh FeaturesDict of the schema (a builder's `DatasetInfo` takes ownership of one)."""
    return tfds.features.FeaturesDict(
        {
            # Where the record came from, so a bad one can be found: "scene-000123",
            # "shard-00001.tar:000045", "data.jsonl:17".
            "id": tfds.features.Text(),
            "task": tfds.features.Text(),  # one of TASKS
            "segments": tfds.features.Sequence(
                {
                    "kind": np.int32,  # KIND_TEXT or KIND_IMAGE
                    "text": tfds.features.Text(),  # "" for an image segment
                    "image": np.int32,  # index into "images"; NO_IMAGE for a text segment
                    "role": np.int32,  # ROLE_NONE, ROLE_USER or ROLE_ASSISTANT
                    "target": np.bool_,  # loss target (text: next token; image: flow NLL)
                }
            ),
            # PNG bytes in, uint8 (h, w, 3) out; sizes may differ between images.
            "images": tfds.features.Sequence(
                tfds.features.Image(shape=(None, None, 3), encoding_format="png")
            ),
            "scene": tfds.features.Text(),  # JSON ground truth (shapes family); "" for real data
        }
    )


FEATURES = features()


@dataclasses.dataclass(frozen=True, eq=False)  # eq on numpy images would be ambiguous
class Segment:
    """One piece of a document: text, or an image (uint8 (h, w, 3))."""

    kind: int
    text: str = ""
    image: np.ndarray | None = None
    role: int = ROLE_NONE
    target: bool = False

    @classmethod
    def of_text(cls, text: str, role: int = ROLE_NONE, target: bool = False) -> Segment:
        return cls(KIND_TEXT, text=text, role=role, target=target)

    @classmethod
    def of_image(cls, image: np.ndarray, role: int = ROLE_NONE, target: bool = False) -> Segment:
        return cls(KIND_IMAGE, image=image, role=role, target=target)


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """A decoded record: `segments` in order, images inline.

    `branches` (made by recipes, never stored in a record): text-only continuations of
    `segments`, each laid out as if it alone followed them; one branch does not see another (the
    layout's `branch_ids`), so k questions about one image cost one image slot, not k."""

    id: str
    task: str
    segments: tuple[Segment, ...]
    scene: str = ""
    branches: tuple[tuple[Segment, ...], ...] = ()

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.segments if s.kind == KIND_IMAGE]


class RecordError(ValueError):
    """A record that breaks the schema; the message names the record id and the field."""


def make_record(
    id: str,  # noqa: A002 - the schema's field name
    task: str,
    segments: Sequence[Segment],
    images: Sequence[np.ndarray] | None = None,
    scene: str | None = None,
) -> dict[str, Any]:
    """Returns the dict a builder yields for one document, images encoded as PNG bytes.

    Images come either inline (`Segment.image` set, `images` None: each image segment gets the next
    index) or as a separate list (`images` given; then every image segment's `image` must be None
    and image segments take the images in order). Raises `RecordError` naming `id` and the field.
    """

    def fail(message: str) -> RecordError:
        return RecordError(f"record {id!r}: {message}")

    if task not in TASKS:
        raise fail(f"task {task!r} is not one of {TASKS}.")
    if not segments:
        raise fail("has no segments; a document needs at least one.")
    image_segments = [s for s in segments if s.kind == KIND_IMAGE]
    if images is None:
        images = [s.image for s in image_segments]
        if any(image is None for image in images):
            raise fail("an image segment has no image (pass it inline or in `images`).")
    else:
        if any(s.image is not None for s in image_segments):
            raise fail("images given both inline and in `images`; give them one way.")
        if len(images) != len(image_segments):
            raise fail(
                f"has {len(image_segments)} image segments but {len(images)} images; "
                "every image segment takes the next image, so the counts must match."
            )

    rows = []
    next_image = 0
    for i, s in enumerate(segments):
        if s.kind not in KINDS:
            raise fail(f"segment {i}: kind {s.kind!r} is not KIND_TEXT (0) or KIND_IMAGE (1).")
        if s.role not in ROLES:
            raise fail(f"segment {i}: role {s.role!r} is not one of {ROLES}.")
        if s.kind == KIND_TEXT:
            if not isinstance(s.text, str):
                raise fail(f"segment {i}: text must be str, got {type(s.text).__name__}.")
            index = NO_IMAGE
        else:
            if s.text:
                raise fail(f"segment {i}: an image segment has text {s.text!r}; it must be ''.")
            index = next_image
            next_image += 1
        rows.append(
            {
                "kind": np.int32(s.kind),
                "text": s.text if s.kind == KIND_TEXT else "",
                "image": np.int32(index),
                "role": np.int32(s.role),
                "target": np.bool_(s.target),
            }
        )
    encoded = [_png_bytes(image, fail, f"image {k}") for k, image in enumerate(images)]
    return {
        "id": id,
        "task": task,
        # Sequence(dict) takes a dict of lists as well as a list of dicts; TFDS prefers the former.
        "segments": {key: [row[key] for row in rows] for key in rows[0]},
        "images": encoded,
        "scene": scene or "",
    }


def decode_record(example: Mapping[str, Any]) -> Document:
    """Turns what `tfds.data_source(...)[i]` returns for this schema into a `Document`."""
    record_id = _text(example["id"])
    segs = example["segments"]
    images = example["images"]
    kinds = np.asarray(segs["kind"])
    texts = segs["text"]
    indices = np.asarray(segs["image"])
    roles = np.asarray(segs["role"])
    targets = np.asarray(segs["target"])
    out = []
    for i, kind in enumerate(kinds):
        if kind == KIND_IMAGE:
            index = int(indices[i])
            if not 0 <= index < len(images):
                raise RecordError(
                    f"record {record_id!r}: segment {i} points at image {index}, but the record "
                    f"has {len(images)} images; rebuild the data set."
                )
            image = np.asarray(images[index], dtype=np.uint8)
            out.append(Segment(KIND_IMAGE, "", image, int(roles[i]), bool(targets[i])))
        else:
            out.append(Segment(KIND_TEXT, _text(texts[i]), None, int(roles[i]), bool(targets[i])))
    return Document(
        id=record_id,
        task=_text(example["task"]),
        segments=tuple(out),
        scene=_text(example["scene"]),
    )


def _text(value: Any) -> str:
    """TFDS hands Text back as bytes (numpy object or bytes_); tolerate str for hand-built dicts."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _png_bytes(image: Any, fail, what: str) -> bytes:
    """PNG bytes of a uint8 (h, w, 3) array (TFDS's own numpy encoder needs TensorFlow)."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        raise fail(f"{what} must be uint8 (h, w, 3), got {array.dtype} {array.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
