"""Grain input pipeline over a TFDS `array_record` data set that is already on local disk.

    source (random access) -> this process's shard -> shuffle -> repeat -> narrow dtypes -> batch
    -> iterator (threads) -> worker processes (only when num_workers > 0)

Batching happens on the random-access dataset, before the iterator and the worker processes, so
one element is one whole batch: workers then split batches between them rather than records, and
the batches (and their order) are the same for any `num_workers`.

The pipeline never builds a data set (building on every host of a multi-host job, racing for the
same directory, is the failure it avoids); run `python -m pretzel_jax.data.prepare` once instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from pretzel_jax.data import digits

# name -> prepare(data_dir): builds that data set under data_dir (idempotent).
DATASETS: dict[str, Callable[[str], None]] = {digits.NAME: digits.prepare}

REQUIRED_KEYS = (
    "name",
    "data_dir",
    "batch_size",
    "num_workers",
    "seed",
    "shuffle",
    "drop_remainder",
)

# Elements are whole batches (see the module docstring), so these count batches, not records.
# Grain's defaults (16 threads, 500 elements) would hold 500 batches in memory.
_READ_THREADS = 4
_PREFETCH_BATCHES = 8


def prepare_dataset(name: str, data_dir: str) -> None:
    """Builds data set `name` under `data_dir` unless it is already there."""
    _check_name(name)
    DATASETS[name](os.fspath(data_dir))


def make_iterator(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """Returns a checkpointable iterator of batches of this process's share of `split`.

    Args:
      data_cfg: `name`, `data_dir`, `batch_size` (global: each process gets
        batch_size // process_count rows), `num_workers` (0 reads in this process), `seed`,
        `shuffle` (whether the train split is shuffled by default), `drop_remainder`.
      split: a split of the data set, optionally sliced the TFDS way ("train", "train[:90%]").
      process_index, process_count: process i reads records i, i + count, ... of the split. The
        shards can differ by one record, so with `num_epochs` set, processes may yield different
        numbers of batches.
      shuffle: defaults to `data_cfg.shuffle` for "train" splits and False otherwise.
      num_epochs: None repeats forever, reshuffled each epoch (deterministic in `seed`). An
        integer gives that many passes, then StopIteration; batches may span epoch boundaries and
        the last partial batch is kept unless `drop_remainder`.

    Yields:
      dicts of numpy arrays with a leading per-process batch dim, e.g. digits:
      {"image": uint8 (b, 8, 8, 1), "label": int32 (b,)}. 64-bit numbers are narrowed to 32 bits
      (JAX's default).

    `it.get_state()` / `it.set_state()` resume exactly; in an Orbax CheckpointManager, save with
    `grain.checkpoint.CheckpointSave(it)` and restore with `grain.checkpoint.CheckpointRestore(it)`.
    """
    _check_config(data_cfg)
    name = data_cfg.name
    _check_name(name)
    local_batch_size = _local_batch_size(data_cfg.batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")

    source = _data_source(name, os.fspath(data_cfg.data_dir), split)
    if shuffle is None:
        shuffle = bool(data_cfg.shuffle) and _split_name(split) == "train"

    ds = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        ds = ds.seed(data_cfg.seed).shuffle()
    ds = ds.repeat(num_epochs)  # Reseeds the shuffle each epoch.
    ds = ds.map(_narrow_dtypes)
    ds = ds.batch(local_batch_size, drop_remainder=bool(data_cfg.drop_remainder))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    if data_cfg.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return iter(it_ds)


def _check_config(data_cfg: ml_collections.ConfigDict) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in data_cfg]
    if missing:
        raise KeyError(f"config.data is missing {missing}; it needs all of {list(REQUIRED_KEYS)}.")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; known: {sorted(DATASETS)}.")


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"config.data.batch_size ({global_batch_size}) must be a positive multiple of the "
            f"process count ({process_count}); it is the global batch."
        )
    return global_batch_size // process_count


def _split_name(split: str) -> str:
    """ "train[:90%]" -> "train"."""
    return re.split(r"[\[(]", split, maxsplit=1)[0].strip()


def _data_source(name: str, data_dir: str, split: str) -> Any:
    """Opens `split` of the prepared data set, or raises one error that says how to prepare it."""
    fix = (
        f"run `python -m pretzel_jax.data.prepare --name {name} --data_dir {data_dir}` "
        "or set config.data.data_dir"
    )
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Data dir {data_dir} does not exist (data set {name!r}): {fix}.")
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(f"Data set {name!r} not found under {data_dir}: {fix}.") from e

    splits = list(builder.info.splits.keys())
    if _split_name(split) not in splits:
        raise ValueError(f"Data set {name!r} has no split {split!r}; it has {splits}.")
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"Data set {name!r} under {data_dir} is stored as {file_format}, but Grain needs "
            f"random access (array_record): delete {builder.data_dir} and {fix}."
        )
    return builder.as_data_source(split)


def _narrow_dtypes(example: Mapping[str, Any]) -> dict[str, Any]:
    """Numpy arrays with 64-bit numbers narrowed to 32 bits (TFDS gives int64 labels)."""
    out = {}
    for key, value in example.items():
        if isinstance(value, Mapping):
            out[key] = _narrow_dtypes(value)
            continue
        array = np.asarray(value)
        if array.dtype == np.int64:
            array = array.astype(np.int32)
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        out[key] = array
    return out
