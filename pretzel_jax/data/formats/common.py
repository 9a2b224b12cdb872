"""What every real-format builder shares: bad-record accounting, image loading, the TFDS builder.

A format module supplies two things to `FormatBuilder`: `_entries(path)`, which walks one source
file and yields `(location, raw)` pairs (raw is the parsed entry, or a `BadRecord` when the entry
could not even be parsed), and `_record(location, raw)`, which turns one raw entry into a schema
record (`schema.make_record`) or raises `BadRecord`. The builder does the rest the same way for
all formats:

- every entry is counted: `total == written + skipped`, checked at the end of each split and
  against what TFDS wrote;
- a bad entry is skipped, counted under its reason (`REASONS`) and logged (WARNING, logger
  `pretzel_jax.data.formats`) with its location ("00001.tar:000000045", "data.jsonl:17",
  "llava.json[3]"), which is also the `id` of the records that are written;
- the per-split `SplitReport`s are stored in the data set's `metadata.json` (key "bad_records")
  and returned by `prepare`; `read_reports` reads them back;
- more than `max_bad_fraction` bad entries in a split stop the build with one `BadRecordsError`
  naming the counts, the first locations and the knob; TFDS then removes the unfinished files;
- records keep their source order (`disable_shuffling`: integer keys in reading order), so two
  builds of the same sources are identical.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

from pretzel_jax.data import schema

log = logging.getLogger("pretzel_jax.data.formats")

DATA_VERSION = "1.0.0"
DEFAULT_MAX_BAD_FRACTION = 0.01
DEFAULT_NUM_THREADS = 8
# Locations of bad entries kept in the stored report (the counts are always complete).
MAX_STORED_EXAMPLES = 100
# Locations quoted in a BadRecordsError.
MAX_QUOTED_EXAMPLES = 5

CORRUPT_IMAGE = "corrupt_image"
MISSING_FILE = "missing_file"
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
BAD_STRUCTURE = "bad_structure"
UNREADABLE_FILE = "unreadable_file"
REASONS = {
    CORRUPT_IMAGE: "an image that does not decode",
    MISSING_FILE: "an image file or tar member that is not there",
    BAD_JSON: "a line, entry or file that is not valid JSON (or not valid UTF-8)",
    MISSING_FIELD: "a required field that is absent, empty or of the wrong type",
    BAD_STRUCTURE: "fields that disagree (list lengths, <image> markers vs images, roles, keys)",
    UNREADABLE_FILE: "a source file (tar shard) that breaks off part way",
}

_CONFIG_NAME = re.compile(r"[a-z0-9_]+")


class BadRecord(Exception):
    """One source entry that cannot become a record; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadRecordsError(ValueError):
    """Too many bad entries in a split (more than `max_bad_fraction`)."""


@dataclasses.dataclass
class SplitReport:
    """What happened to every entry of one split's source."""

    split: str
    source: str
    total: int = 0
    written: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    # The first MAX_STORED_EXAMPLES bad entries: {"location", "reason", "detail"}.
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, location: str, bad: BadRecord) -> None:
        self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1
        if len(self.examples) < MAX_STORED_EXAMPLES:
            self.examples.append({"location": location, "reason": bad.reason, "detail": bad.detail})
        log.warning("%s: skipped %s (%s): %s", self.source, location, bad.reason, bad.detail)

    def check(self, max_bad_fraction: float) -> None:
        """Raises unless every entry is accounted for and few enough were bad."""
        if self.total != self.written + self.num_skipped:
            raise RuntimeError(
                f"{self.split} split of {self.source}: {self.total} entries read but "
                f"{self.written} written + {self.num_skipped} skipped; this is a bug."
            )
        if self.total == 0:
            raise BadRecordsError(
                f"{self.split} split: no entries found in {self.source}; point the source at "
                "the right file or folder."
            )
        if self.num_skipped > max_bad_fraction * self.total:
            quoted = "; ".join(
                f"{e['location']} ({e['reason']}: {e['detail']})"
                for e in self.examples[:MAX_QUOTED_EXAMPLES]
            )
            raise BadRecordsError(
                f"{self.split} split of {self.source}: {self.num_skipped} of {self.total} "
                f"entries are bad ({self.num_skipped / self.total:.2%}), more than "
                f"max_bad_fraction={max_bad_fraction} allows. Counts by reason: "
                f"{dict(sorted(self.skipped.items()))}. First bad entries: {quoted}. Fix the "
                "data, or raise max_bad_fraction (prepare_*(..., max_bad_fraction=...) or "
                "--max_bad_fraction) to build without them."
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> SplitReport:
        return cls(**value)


# ---------------------------------------------------------------------------------------------
# Images.


def load_image(path: str | os.PathLike, max_side: int | None) -> np.ndarray:
    """Reads an image file as uint8 RGB (h, w, 3); raises BadRecord if missing or corrupt."""
    if not os.path.isfile(path):
        raise BadRecord(MISSING_FILE, f"image file {os.fspath(path)} does not exist")
    with open(path, "rb") as f:
        return decode_image(f.read(), os.fspath(path), max_side)


def decode_image(data: bytes, what: str, max_side: int | None) -> np.ndarray:
    """Decodes image bytes to uint8 RGB (h, w, 3), at most `max_side` on the longer side.

    EXIF orientation is applied; transparent images are composited over white (what a viewer
    shows, and not the arbitrary colours hidden under alpha 0); grayscale, palette and CMYK
    images are converted; 16-bit grayscale keeps its high byte. Raises BadRecord(CORRUPT_IMAGE)
    for anything PIL cannot decode completely (truncated files included).
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = _to_rgb(ImageOps.exif_transpose(opened))
    # PIL reports undecodable data as OSError (UnidentifiedImageError, truncation), SyntaxError
    # or ValueError depending on the plugin; DecompressionBombError for absurd sizes.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(CORRUPT_IMAGE, f"{what}: {type(e).__name__}: {e}") from None
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = tuple(max(1, int(side * scale + 0.5)) for side in image.size)  # half up
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        # PIL's own I;16 -> RGB conversion clips at 255 instead of scaling.
        high = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(high[..., None], 3, axis=-1))
    if image.mode in ("I", "F"):
        raise ValueError(f"{image.mode!r} (32-bit) images are not supported; convert to 8-bit")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Sources.


def source_files(source: str | os.PathLike, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of one split's source: the file itself, or a folder's files with `suffixes`
    (not recursive), sorted by name so the output order is fixed."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise FileNotFoundError(f"{path} holds no {'/'.join(suffixes)} files.")
        return files
    raise FileNotFoundError(
        f"source {path} does not exist; give a {'/'.join(suffixes)} file or a folder."
    )


def location_name(file: Path, source: str) -> str:
    """`file` as named in locations: relative to the source folder, or its bare name."""
    root = Path(source)
    return file.relative_to(root).as_posix() if root.is_dir() else file.name


def normalize_sources(src: str | os.PathLike | Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """A path (-> split "train") or {split: path}, as {split: absolute path}."""
    if isinstance(src, Mapping):
        if not src:
            raise ValueError("src is an empty mapping; give {split: path}.")
        return {str(split): os.path.abspath(path) for split, path in src.items()}
    return {"train": os.path.abspath(src)}


def jsonl_entries(file: Path, name: str) -> Iterator[tuple[str, Any]]:
    """(location "name:line", parsed JSON or BadRecord) per non-blank line (1-based lines)."""
    with open(file, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            location = f"{name}:{line_number}"
            try:
                text = line.decode("utf-8")
                if not text.strip():
                    continue  # blank lines (a trailing newline, say) hold no entry
                yield location, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield location, BadRecord(BAD_JSON, f"{type(e).__name__}: {e}")


def resolve_image(root: Path, value: Any, field: str) -> Path:
    """The image file that entry field `field` (a path relative to `root`) names."""
    if value is None:
        raise BadRecord(MISSING_FIELD, f"no {field}")
    if not isinstance(value, str) or not value:
        raise BadRecord(MISSING_FIELD, f"{field} is {value!r}, not an image path")
    return root / value


def text_field(entry: Mapping[str, Any], field: str, *, allow_empty: bool = False) -> str:
    """entry[field] as a str; raises BadRecord(MISSING_FIELD) naming the field otherwise."""
    if field not in entry or entry[field] is None:
        raise BadRecord(MISSING_FIELD, f"no {field!r} field")
    value = entry[field]
    if not isinstance(value, str):
        raise BadRecord(MISSING_FIELD, f"{field!r} is a {type(value).__name__}, not a string")
    if not allow_empty and not value.strip():
        raise BadRecord(MISSING_FIELD, f"{field!r} is empty")
    return value


# ---------------------------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass(eq=False)
class FormatConfig(tfds.core.BuilderConfig):
    """The build knobs; the config `name` names the data set ("<builder>/<name>").

    Attributes:
      src: {split: absolute source path (file or folder)}.
      max_side: resize images whose longer side exceeds this (aspect kept); None keeps sizes.
      max_bad_fraction: the largest fraction of bad entries per split that is skipped; more
        stops the build.
      image_root: folder that relative image paths start from; None means each source file's
        folder (formats that name image files only).
    """

    src: dict[str, str] = dataclasses.field(default_factory=dict)
    max_side: int | None = None
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    image_root: str | None = None

    def knobs(self) -> dict[str, Any]:
        """The fields that decide the content (stored with the data set and compared on reuse)."""
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in base}


class FormatBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared TFDS builder of the real formats (see the module docstring).

    Subclasses set `name`, `FORMAT_DESCRIPTION`, `SUFFIXES` (source file endings) and implement
    `_entries` and `_record`. `skip_registration`: data sets are read from their files
    (`tfds.data_source("<name>/<config>", data_dir=...)`), so the global registry is not needed.
    """

    code_path = epath.Path(__file__)  # see digits.py: avoids TFDS's package-metadata lookup
    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {DATA_VERSION: "First version."}
    FORMAT_DESCRIPTION = ""
    SUFFIXES: tuple[str, ...] = ()
    CONFIG_CLASS: type[FormatConfig] = FormatConfig

    def __init__(self, *, num_threads: int = DEFAULT_NUM_THREADS, **kwargs: Any):
        self._num_threads = num_threads
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.FORMAT_DESCRIPTION,
            features=schema.features(),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep the source order (see the module docstring)
        )

    @property
    def format_config(self) -> FormatConfig:
        config = self.builder_config
        if not isinstance(config, FormatConfig):
            raise ValueError(
                f"{self.name} is built from a FormatConfig; use its prepare_* function."
            )
        return config

    def image_root(self, file: Path) -> Path:
        return Path(self.format_config.image_root) if self.format_config.image_root else file.parent

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Local data only.
        self.info.metadata["knobs"] = self.format_config.knobs()
        self.info.metadata["bad_records"] = {}
        return {
            split: self._generate_examples(split, source)
            for split, source in self.format_config.src.items()
        }

    def _generate_examples(self, split: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
        report = SplitReport(split=split, source=source)
        entries = (
            (location, raw)
            for file in source_files(source, self.SUFFIXES)
            for location, raw in self._entries(file, location_name(file, source))
        )
        for key, (location, outcome) in enumerate(
            ordered_map(self._try_record, entries, self._num_threads)
        ):
            report.total += 1
            if isinstance(outcome, BadRecord):
                report.skip(location, outcome)
                continue
            report.written += 1
            yield key, outcome
        report.check(self.format_config.max_bad_fraction)
        self.info.metadata["bad_records"][split] = report.to_json()

    def _try_record(self, item: tuple[str, Any]) -> tuple[str, dict[str, Any] | BadRecord]:
        location, raw = item
        if isinstance(raw, BadRecord):
            return location, raw
        try:
            return location, self._record(location, raw)
        except BadRecord as bad:
            return location, bad

    def _entries(self, file: Path, name: str) -> Iterator[tuple[str, Any]]:
        """Yields (location, raw entry or BadRecord) for every entry of `file` (named `name`)."""
        raise NotImplementedError

    def _record(self, location: str, raw: Any) -> dict[str, Any]:
        """The schema record of one raw entry; raises BadRecord."""
        raise NotImplementedError


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_threads: int) -> Iterator[Any]:
    """`map(fn, items)` on `num_threads` threads, in order, holding at most 2x that many items.

    (`Executor.map` would read all of `items` up front.) Image decoding and PNG encoding release
    the GIL, so threads speed up the build; the order, and so the output, does not change.
    """
    if num_threads <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        window: collections.deque[concurrent.futures.Future] = collections.deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * num_threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def prepare(
    builder_cls: type[FormatBuilder],
    src: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    name: str,
    num_threads: int,
    **knobs: Any,
) -> dict[str, SplitReport]:
    """Builds `<builder_cls.name>/<name>` under `data_dir` unless it is there; returns its reports.

    A data set already built with other knobs (sources included) is an error, not silently reused.
    """
    if not _CONFIG_NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be lowercase letters, digits and '_'.")
    max_bad_fraction = knobs.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
    if knobs.get("max_side") is not None and knobs["max_side"] < 1:
        raise ValueError(f"max_side must be None or >= 1, got {knobs['max_side']}.")
    if knobs.get("image_root") is not None:
        knobs["image_root"] = os.path.abspath(knobs["image_root"])
    config = builder_cls.CONFIG_CLASS(
        name=name, version=DATA_VERSION, src=normalize_sources(src), **knobs
    )
    for source in config.src.values():  # a missing source fails here, not inside TFDS
        source_files(source, builder_cls.SUFFIXES)
    builder = builder_cls(
        data_dir=os.fspath(data_dir),
        config=config,
        file_format="array_record",
        num_threads=num_threads,
    )
    dataset = f"{builder_cls.name}/{name}"
    if builder.is_prepared():
        knobs_stored, reports = _stored(dataset, data_dir)
        if knobs_stored != config.knobs():
            raise ValueError(
                f"{dataset} under {data_dir} was built with {knobs_stored}, not "
                f"{config.knobs()}; delete {builder.data_dir} or pick another name to build it "
                "again."
            )
        return reports
    builder.download_and_prepare()
    reports = read_reports(dataset, data_dir)
    for split, report in reports.items():
        num_examples = builder.info.splits[split].num_examples
        if num_examples != report.written:
            raise RuntimeError(
                f"{dataset} split {split}: TFDS wrote {num_examples} records but the builder "
                f"yielded {report.written}; this is a bug."
            )
    return reports


def read_reports(dataset: str, data_dir: str | os.PathLike) -> dict[str, SplitReport]:
    """{split: SplitReport} stored with a built data set ("<builder>/<name>")."""
    return _stored(dataset, data_dir)[1]


def _stored(dataset: str, data_dir: str | os.PathLike) -> tuple[dict, dict[str, SplitReport]]:
    """(build knobs, {split: SplitReport}) from the data set's metadata.json."""
    builder = tfds.builder_from_directory(_dataset_dir(dataset, data_dir))
    metadata = builder.info.metadata or {}
    if "bad_records" not in metadata:
        raise ValueError(f"{dataset} under {data_dir} was not built by pretzel_jax.data.formats.")
    reports = {s: SplitReport.from_json(r) for s, r in metadata["bad_records"].items()}
    return metadata["knobs"], reports


def _dataset_dir(dataset: str, data_dir: str | os.PathLike) -> str:
    path = Path(data_dir, *dataset.split("/"), DATA_VERSION)
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset} is not built under {data_dir} ({path} is missing).")
    return os.fspath(path)
