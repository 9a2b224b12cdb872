"""OBELICS / MMC4-style interleaved documents in JSONL -> task "interleaved".

Each line is a document with parallel lists `texts` and `images` of equal length; at each
position exactly one of the two is null (OBELICS' layout; MMC4 converts to it by placing each
image at its matched text index):

    {"texts": ["A cat.", null, "It sleeps."], "images": [null, "img/cat.jpg", null], ...}

Image paths are relative to `image_root` (default: the JSONL file's folder). Record: the
non-empty texts and the images in order, all ROLE_NONE loss targets; a document without images
becomes task "text". One unreadable image makes the whole document bad (it is not written with a
hole). Documents are located as "file.jsonl:line" (1-based); blank lines are no documents.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pretzel_jax.data import schema
from pretzel_jax.data.formats import common
from pretzel_jax.data.formats.common import BadRecord

NAME = "interleaved_documents"


class InterleavedDocuments(common.FormatBuilder, skip_registration=True):
    name = NAME
    FORMAT_DESCRIPTION = "Interleaved text-image documents (OBELICS/MMC4-style JSONL)."
    SUFFIXES = (".jsonl",)

    def _entries(self, file: Path, name: str) -> Iterator[tuple[str, Any]]:
        root = self.image_root(file)
        for location, entry in common.jsonl_entries(file, name):
            yield location, entry if isinstance(entry, BadRecord) else (entry, root)

    def _record(self, location: str, raw: tuple[Any, Path]) -> dict[str, Any]:
        entry, root = raw
        if not isinstance(entry, dict):
            raise BadRecord(common.BAD_JSON, f"the line is a {type(entry).__name__}, not an object")
        texts, images = entry.get("texts"), entry.get("images")
        for field, value in (("texts", texts), ("images", images)):
            if not isinstance(value, list):
                raise BadRecord(common.MISSING_FIELD, f"no {field!r} list")
        if len(texts) != len(images):
            raise BadRecord(
                common.BAD_STRUCTURE,
                f"'texts' has {len(texts)} entries but 'images' has {len(images)}; they are "
                "parallel lists",
            )
        segments = []
        for i, (text, image) in enumerate(zip(texts, images)):
            if (text is None) == (image is None):
                both = "both" if text is not None else "neither"
                raise BadRecord(
                    common.BAD_STRUCTURE,
                    f"position {i} has {both} of a text and an image; exactly one is expected",
                )
            if image is not None:
                path = common.resolve_image(root, image, f"images[{i}]")
                pixels = common.load_image(path, self.format_config.max_side)
                segments.append(schema.Segment.of_image(pixels, target=True))
            elif not isinstance(text, str):
                raise BadRecord(common.MISSING_FIELD, f"texts[{i}] is a {type(text).__name__}")
            elif text.strip():
                segments.append(schema.Segment.of_text(text, target=True))
        if not segments:
            raise BadRecord(common.BAD_STRUCTURE, "the document has no text and no image")
        has_image = any(s.kind == schema.KIND_IMAGE for s in segments)
        return schema.make_record(location, "interleaved" if has_image else "text", segments)


def prepare_interleaved(
    src: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    name: str = "default",
    max_side: int | None = None,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
    num_threads: int = common.DEFAULT_NUM_THREADS,
) -> dict[str, common.SplitReport]:
    """Builds `interleaved_documents/<name>` under `data_dir`; returns the reports.

    Args:
      src: a .jsonl file or a folder of them (split "train"), or {split: file or folder}.
      image_root: the folder image paths are relative to; None: each JSONL file's folder.
      Others: see `prepare_webdataset`.
    """
    return common.prepare(
        InterleavedDocuments,
        src,
        data_dir,
        name=name,
        num_threads=num_threads,
        max_side=max_side,
        max_bad_fraction=max_bad_fraction,
        image_root=None if image_root is None else os.fspath(image_root),
    )
