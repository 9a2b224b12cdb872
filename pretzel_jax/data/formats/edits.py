"""Image-editing triplets in JSONL -> task "edit".

Each line: {"source": "img/0001_before.png", "instruction": "make the sky red",
"target": "img/0001_after.png"}, image paths relative to `image_root` (default: the JSONL file's
folder). Record: [image(source), text(instruction, stripped), image(target, loss target)], all
ROLE_NONE. Triplets are located as "file.jsonl:line" (1-based); blank lines are no triplets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pretzel_jax.data import schema
from pretzel_jax.data.formats import common
from pretzel_jax.data.formats.common import BadRecord

NAME = "edit_triplets"


class EditTriplets(common.FormatBuilder, skip_registration=True):
    name = NAME
    FORMAT_DESCRIPTION = "Image-editing triplets (source image, instruction, target image)."
    SUFFIXES = (".jsonl",)

    def _entries(self, file: Path, name: str) -> Iterator[tuple[str, Any]]:
        root = self.image_root(file)
        for location, entry in common.jsonl_entries(file, name):
            yield location, entry if isinstance(entry, BadRecord) else (entry, root)

    def _record(self, location: str, raw: tuple[Any, Path]) -> dict[str, Any]:
        entry, root = raw
        if not isinstance(entry, dict):
            raise BadRecord(common.BAD_JSON, f"the line is a {type(entry).__name__}, not an object")
        instruction = common.text_field(entry, "instruction").strip()
        paths = [common.resolve_image(root, entry.get(f), repr(f)) for f in ("source", "target")]
        source, target = (common.load_image(p, self.format_config.max_side) for p in paths)
        return schema.make_record(
            location,
            "edit",
            [
                schema.Segment.of_image(source),
                schema.Segment.of_text(instruction),
                schema.Segment.of_image(target, target=True),
            ],
        )


def prepare_edits(
    src: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    name: str = "default",
    max_side: int | None = None,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
    num_threads: int = common.DEFAULT_NUM_THREADS,
) -> dict[str, common.SplitReport]:
    """Builds `edit_triplets/<name>` under `data_dir`; returns the reports.

    Args:
      src: a .jsonl file or a folder of them (split "train"), or {split: file or folder}.
      image_root: the folder image paths are relative to; None: each JSONL file's folder.
      Others: see `prepare_webdataset`.
    """
    return common.prepare(
        EditTriplets,
        src,
        data_dir,
        name=name,
        num_threads=num_threads,
        max_side=max_side,
        max_bad_fraction=max_bad_fraction,
        image_root=None if image_root is None else os.fspath(image_root),
    )
