"""Safetensors in and out for the converters: whole-file reads, lazy per-tensor slice reads over
one file or a sharded Hugging Face folder, and sharded writes with the index file.

Only safetensors are read; pickled PyTorch files (.bin, .pth, ...) are refused with the recipe to
re-save them, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")


class ConversionError(ValueError):
    """A checkpoint or config that cannot be ported; the message names what and why."""


def read_hf_config(folder: str | Path, what: str) -> tuple[dict, Path]:
    """(config.json of a Hugging Face folder as a dict, its path); `what` names the expected
    model in the error ("a Hugging Face DINOv2 folder")."""
    file = Path(folder) / "config.json"
    try:
        return json.loads(file.read_text()), file
    except FileNotFoundError:
        raise ConversionError(
            f"{file} does not exist: point to {what} (config.json + model.safetensors)"
        ) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from None


def mismatch_error(what: str, problems: list[str], fix: str, limit: int = 25) -> ConversionError:
    """One error for every problem found comparing weights with their config (the first `limit`
    listed, one per line), then how to fix it."""
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    listed = "\n  ".join(problems[:limit])
    return ConversionError(f"{what} ({len(problems)} problems):\n  {listed}{more}\n{fix}")


def refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise ConversionError(
            f"{path} is a pickled PyTorch file, which we never load. Re-save it as safetensors "
            "where you trust it: `sd = torch.load(path, weights_only=True)` then "
            "`safetensors.torch.save_file(sd, 'model.safetensors')`"
        )


def _unreadable(path: Path, e: Exception) -> ConversionError:
    return ConversionError(
        f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: "
        "copy or download it again"
    )


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy (bf16/fp16 files included)."""
    path = Path(path)
    refuse_pickle(path)
    if not path.exists():
        raise ConversionError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise _unreadable(path, e) from None


def write_safetensors(
    tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None
) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)


class SafetensorsFolder:
    """Lazy view of `model.safetensors` or of the shards an index file names: which file holds
    each tensor, its shape and dtype, and reads of any slice of it. Every file is opened (and
    its header checked against its size) up front, so a truncated shard fails before any weight
    is read. Use as a context manager; the files stay memory-mapped until it exits."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        if path.is_file():
            refuse_pickle(path)
            files, listed = [path], None
        elif (path / INDEX_FILE).exists():
            files, listed = self._from_index(path / INDEX_FILE)
        elif (path / SINGLE_FILE).exists():
            files, listed = [path / SINGLE_FILE], None
        else:
            pickled = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
            hint = (
                f"; it has pickled weights {pickled}, which we never load (re-save them with "
                "`save_pretrained(dir, safe_serialization=True)` where you trust them)"
                if pickled
                else ""
            )
            if not path.exists():
                raise ConversionError(f"checkpoint folder {path} does not exist")
            raise ConversionError(f"{path} has no {SINGLE_FILE} and no {INDEX_FILE}{hint}")
        try:
            for file in files:
                self._open(file)
        except BaseException:
            self.close()
            raise
        if listed is not None:
            self._check_index(listed)

    def _from_index(self, index: Path) -> tuple[list[Path], dict[str, str]]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(
                f"{index} is not a valid index file (needs a 'weight_map'): {e}"
            ) from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (index.parent / n).is_file()]
        if missing:
            raise ConversionError(
                f"{index} points to shard files that are not in {index.parent}: {missing}; copy "
                "the missing shards into the folder"
            )
        return [index.parent / n for n in names], weight_map

    def _open(self, file: Path) -> None:
        try:
            handle = safe_open(str(file), framework="np")
        except SafetensorError as e:
            raise _unreadable(file, e) from None
        self._handles[file] = handle
        for key in handle.keys():  # noqa: SIM118
            if key in self.file_of:
                raise ConversionError(
                    f"tensor {key} is stored twice, in {self.file_of[key].name} and {file.name}"
                )
            self.file_of[key] = file

    def _check_index(self, weight_map: dict[str, str]) -> None:
        found = {k: f.name for k, f in self.file_of.items()}
        wrong = [
            f"{k} (index says {v}, found in {found.get(k, 'no file')})"
            for k, v in weight_map.items()
            if found.get(k) != v
        ]
        if wrong:
            raise ConversionError(
                f"{self.path / INDEX_FILE} does not match its shards: "
                + "; ".join(wrong[:10])
                + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
                + ". The folder mixes files of different checkpoints: copy it again"
            )

    def names(self) -> list[str]:
        return list(self.file_of)

    def _slice(self, key: str):
        return self._handles[self.file_of[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor, or only the part `index` (unit-step slices, one per leading dim) selects;
        only those bytes are read from disk."""
        try:
            part = self._slice(key)
            return np.asarray(part[index] if index is not None else part[:])
        except SafetensorError as e:
            raise _unreadable(self.file_of[key], e) from None

    def close(self) -> None:
        for h in self._handles.values():
            close = getattr(h, "__exit__", None)
            if close is not None:
                close(None, None, None)
        self._handles.clear()

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(
    folder: str | Path,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int,
    metadata: dict | None = None,
) -> list[str]:
    """Write tensors as Hugging Face does: `model.safetensors`, or `model-0000i-of-0000n`
    shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own) plus the
    index file. `specs` lists (name, shape, dtype) in file order; `produce(name)` makes one
    tensor when its shard is written, so at most one shard is held in host memory."""
    folder = Path(folder)
    shards: list[list[str]] = [[]]
    size, total = 0, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    files = [shard_name(i, len(shards)) for i in range(len(shards))]
    for names, file in zip(shards, files, strict=True):
        write_safetensors({k: produce(k) for k in names}, folder / file, metadata)
    if len(files) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: f for names, f in zip(shards, files, strict=True) for k in names},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files
