"""Image-text pairs in WebDataset tar shards (the img2dataset layout) -> task "caption".

A shard holds samples as adjacent members sharing a key (the member name up to the first dot of
its base name): `000000012.jpg` (or .jpeg/.png/.webp) and the caption, `000000012.txt` or a
`000000012.json` whose `caption_field` (default "caption") holds it; other members (img2dataset's
.json metadata when a .txt is there, .parquet side files) are ignored. Each key is one entry,
located as "<shard>.tar:<key>". Record: [text(caption), image(target)].

    prepare_webdataset("/data/cc3m_shards", "/data/tfds", name="cc3m", max_side=512)
    tfds.data_source("webdataset_captions/cc3m", data_dir="/data/tfds", split="train")
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pretzel_jax.data import schema
from pretzel_jax.data.formats import common
from pretzel_jax.data.formats.common import BadRecord

NAME = "webdataset_captions"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(eq=False)
class WebDatasetConfig(common.FormatConfig):
    """`caption_field`: the .json field that holds the caption when a sample has no .txt."""

    caption_field: str = "caption"


class WebDatasetCaptions(common.FormatBuilder, skip_registration=True):
    name = NAME
    FORMAT_DESCRIPTION = "Image-text pairs from WebDataset tar shards (img2dataset layout)."
    SUFFIXES = (".tar",)
    CONFIG_CLASS = WebDatasetConfig

    def _entries(self, file: Path, name: str) -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        key, members = None, {}
        try:
            with tarfile.open(file, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = split_member_name(member.name)
                    if member_key != key:
                        if key is not None:
                            yield _sample(name, key, members, seen)
                        key, members = member_key, {}
                    data = tar.extractfile(member).read()  # after the switch: a failure is key's
                    # A repeated name is kept as a marker so the sample is reported, not merged.
                    members[extension] = None if extension in members else data
                # tarfile ends quietly at a cut-off header; a whole shard ends in a zero block.
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("no end-of-archive block: the file is cut short")
        except (tarfile.TarError, OSError, EOFError) as e:
            location = f"{name}:{key}" if key is not None else name
            yield (
                location,
                BadRecord(
                    common.UNREADABLE_FILE,
                    f"{name} breaks off here ({type(e).__name__}: {e}); the rest of it is not read",
                ),
            )
            return
        if key is not None:
            yield _sample(name, key, members, seen)

    def _record(self, location: str, members: Mapping[str, bytes]) -> dict[str, Any]:
        found = [e for e in IMAGE_EXTENSIONS if e in members]
        if not found:
            raise BadRecord(
                common.MISSING_FILE, f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)})"
            )
        if len(found) > 1:
            raise BadRecord(common.BAD_STRUCTURE, f"several image members: {found}")
        caption = self._caption(members).strip()
        if not caption:
            raise BadRecord(common.MISSING_FIELD, "the caption is empty")
        image = common.decode_image(
            members[found[0]], f"{location}.{found[0]}", self.format_config.max_side
        )
        return schema.make_record(
            location,
            "caption",
            [schema.Segment.of_text(caption), schema.Segment.of_image(image, target=True)],
        )

    def _caption(self, members: Mapping[str, bytes]) -> str:
        field = self.format_config.caption_field
        if "txt" in members:
            try:
                return members["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord(
                    common.MISSING_FIELD, f"the .txt caption is not UTF-8: {e}"
                ) from None
        if "json" not in members:
            raise BadRecord(common.MISSING_FIELD, f"no caption (.txt, or .json with {field!r})")
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRecord(common.BAD_JSON, f".json: {type(e).__name__}: {e}") from None
        if not isinstance(meta, dict):
            raise BadRecord(common.BAD_JSON, f".json holds a {type(meta).__name__}, not an object")
        return common.text_field(meta, field)


def split_member_name(member_name: str) -> tuple[str, str]:
    """WebDataset's rule: "dir/0012.seg.png" -> ("dir/0012", "seg.png"); extension lowercased."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _sample(name: str, key: str, members: dict, seen: set[str]) -> tuple[str, Any]:
    location = f"{name}:{key}"
    if key in seen:
        return location, BadRecord(
            common.BAD_STRUCTURE,
            "the key appears again after other keys; a sample's members must be adjacent",
        )
    seen.add(key)
    repeated = sorted(e for e, data in members.items() if data is None)
    if repeated:
        return location, BadRecord(common.BAD_STRUCTURE, f"repeated members .{repeated}")
    return location, members


def prepare_webdataset(
    src: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    name: str = "default",
    max_side: int | None = None,
    max_bad_fraction: float = common.DEFAULT_MAX_BAD_FRACTION,
    caption_field: str = "caption",
    num_threads: int = common.DEFAULT_NUM_THREADS,
) -> dict[str, common.SplitReport]:
    """Builds `webdataset_captions/<name>` under `data_dir` from tar shards; returns the reports.

    Args:
      src: a .tar shard or a folder of them (split "train"), or {split: shard or folder}.
      data_dir: the TFDS data dir.
      name: the data set's config name (lowercase, digits, '_').
      max_side: resize images whose longer side is larger (aspect kept); None keeps sizes.
      max_bad_fraction: the fraction of bad samples per split that may be skipped.
      caption_field: the .json field holding the caption when a sample has no .txt.
      num_threads: decode/encode threads (the output does not depend on it).
    """
    return common.prepare(
        WebDatasetCaptions,
        src,
        data_dir,
        name=name,
        num_threads=num_threads,
        max_side=max_side,
        max_bad_fraction=max_bad_fraction,
        caption_field=caption_field,
    )
