"""LLaVA-style conversation JSON -> task "vqa" (or "text" for conversations without an image).

The source is a .json file holding a list of entries (LLaVA's `llava_v1_5_mix665k.json`), or a
.jsonl file with one entry per line, or a folder of those:

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`image` is a path relative to `image_root` (default: the JSON file's folder), or a list of them
for multi-image entries, or absent for text-only conversations. Each `<image>` marker in a human
turn places the next image there: the turn becomes [text before, image, text after] (texts
stripped, empty ones dropped), all ROLE_USER and not targets; a gpt turn becomes one
ROLE_ASSISTANT target text. "user"/"assistant" are accepted for "human"/"gpt". An entry is bad if
the markers do not match the images one to one, a marker is in an answer, a role is unknown, or
there is no answer. Entries are located as "file.json[index]" (0-based) or "file.jsonl:line".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pretzel_jax.data import schema
from pretzel_jax.data.formats import common
from pretzel_jax.data.formats.common import BadRecord

NAME = "llava_conversations"
IMAGE_MARKER = "<image>"
SPEAKERS = {
    "human": schema.ROLE_USER,
    "user": schema.ROLE_USER,
    "gpt": schema.ROLE_ASSISTANT,
    "assistant": schema.ROLE_ASSISTANT,
}


class LlavaConversations(common.FormatBuilder, skip_registration=True):
    name = NAME
    FORMAT_DESCRIPTION = "Visual question answering conversations in LLaVA's JSON format."
    SUFFIXES = (".json", ".jsonl")

    def _entries(self, file: Path, name: str) -> Iterator[tuple[str, Any]]:
        root = self.image_root(file)
        if file.suffix == ".jsonl":
            for location, entry in common.jsonl_entries(file, name):
                yield location, entry if isinstance(entry, BadRecord) else (entry, root)
            return
        try:
            with open(file, "rb") as f:
                entries = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield name, BadRecord(common.BAD_JSON, f"the file: {type(e).__name__}: {e}")
            return
        if not isinstance(entries, list):
            yield (
                name,
                BadRecord(
                    common.BAD_JSON,
                    f"the file holds a {type(entries).__name__}, not a list of entries",
                ),
            )
            return
        for index, entry in enumerate(entries):
            yield f"{name}[{index}]", (entry, root)

    def _record(self, location: str, raw: tuple[Any, Path]) -> dict[str, Any]:
        entry, root = raw
        if not isinstance(entry, dict):
            raise BadRecord(
                common.BAD_JSON, f"the entry is a {type(entry).__name__}, not an object"
            )
        paths = _image_paths(entry)
        segments = _segments(entry)
        markers = sum(s.kind == schema.KIND_IMAGE for s in segments)
        if markers != len(paths):
            raise BadRecord(
                common.BAD_STRUCTURE,
                f"{markers} {IMAGE_MARKER} markers in human turns but {len(paths)} images; each "
                "image needs exactly one marker",
            )
        if not any(s.role == schema.ROLE_ASSISTANT for s in segments):
            raise BadRecord(common.BAD_STRUCTURE, "no answer (no 'gpt' turn)")
        images = [
            common.load_image(
                common.resolve_image(root, path, f"image[{k}]"), self.format_config.max_side
            )
            for k, path in enumerate(paths)
        ]
        return schema.make_record(location, "vqa" if images else "text", segments, images)


def _image_paths(entry: Mapping[str, Any]) -> list[Any]:
    value = entry.get("image")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise BadRecord(common.MISSING_FIELD, f"'image' is a {type(value).__name__}, not a path")


def _segments(entry: Mapping[str, Any]) -> list[schema.Segment]:
    """The conversation's segments; image segments hold no pixels yet (`make_record(images=)`)."""
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord(common.MISSING_FIELD, "no 'conversations' list")
    segments = []
    for t, turn in enumerate(turns):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise BadRecord(common.MISSING_FIELD, f"{where} is not an object")
        role = SPEAKERS.get(turn.get("from"))
        if role is None:
            raise BadRecord(
                common.BAD_STRUCTURE,
                f"{where}['from'] is {turn.get('from')!r}; expected one of {sorted(SPEAKERS)}",
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise BadRecord(common.MISSING_FIELD, f"{where} has no string 'value'")
        if role == schema.ROLE_ASSISTANT:
            if IMAGE_MARKER in value:
                raise BadRecord(common.BAD_STRUCTURE, f"{where} is an answer with {IMAGE_MARKER}")
            segments.append(schema.Segment.of_text(value, role, target=True))
            continue
        for k, piece in enumerate(value.split(IMAGE_MARKER)):
            if k > 0:
                segments.append(schema.Segment(schema.KIND_IMAGE, role=role))
            if piece.strip():
                segments.append(schema.Segment.of_text(piece.strip(), role))
    return segments


def prepare_llava(
    src: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    name: str = "default",
    max_side: int | None = None,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
    num_threads: int = common.DEFAULT_NUM_THREADS,
) -> dict[str, common.SplitReport]:
    """Builds `llava_conversations/<name>` under `data_dir`; returns the reports.

    Args:
      src: a .json/.jsonl file or a folder of them (split "train"), or {split: file or folder}.
      image_root: the folder image paths are relative to; None: each JSON file's folder.
      Others: see `prepare_webdataset`.
    """
    return common.prepare(
        LlavaConversations,
        src,
        data_dir,
        name=name,
        num_threads=num_threads,
        max_side=max_side,
        max_bad_fraction=max_bad_fraction,
        image_root=None if image_root is None else os.fspath(image_root),
    )
