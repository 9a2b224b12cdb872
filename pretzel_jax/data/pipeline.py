"""Grain input pipelines over TFDS `array_record` data sets that are already on local disk.

Two kinds: `make_iterator` batches the records of one data set as they are (digits);
`make_stage_iterator` builds the curriculum stage pipelines over the shared multimodal schema
(`schema.py`): recipes, weighted mixture, sequence layout and packing (see the section below).

The plain pipeline:

    source (random access) -> this process's shard -> shuffle -> repeat -> narrow dtypes -> batch
    -> iterator (threads) -> worker processes (only when num_workers > 0)

Batching happens on the random-access dataset, before the iterator and the worker processes, so
one element is one whole batch: workers then split batches between them rather than records, and
the batches (and their order) are the same for any `num_workers`.

The pipeline never builds a data set (building on every host of a multi-host job, racing for the
same directory, is the failure it avoids); run `python -m pretzel_jax.data.prepare` once instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from tensorflow_datasets.core import read_only_builder

from pretzel_jax.data import digits, formats, layout, schema
from pretzel_jax.data.shapes.builder import PREPARERS as SHAPES_PREPARERS
from pretzel_jax.data.shapes.scene import SceneSpec, cell_labels
from pretzel_jax.data.shapes.tasks import ask_many, qa_segments

# name -> prepare(data_dir): builds that data set under data_dir (idempotent).
DATASETS: dict[str, Callable[[str], None]] = {digits.NAME: digits.prepare, **SHAPES_PREPARERS}


def _image_view(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": record["images"][0]}


def _cells_view(record: Mapping[str, Any]) -> dict[str, Any]:
    doc = schema.decode_record(record)
    scene = SceneSpec.from_dict(json.loads(doc.scene)["images"][0])
    return {"image": record["images"][0], "cells": cell_labels(scene)}


# Views of caption records for image models, name -> (source data set, record -> example):
# images alone for the FAE, {"image": uint8 (H, W, 3)}; images with dense scene labels for the
# vision-tower pretraining, plus "cells": int32 (9, 3) (`shapes.scene.cell_labels`).
VIEWS: dict[str, tuple[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "shapes_images": ("shapes/captions", _image_view),
    "shapes_images_tiny": ("shapes/captions_tiny", _image_view),
    "shapes_cells": ("shapes/captions", _cells_view),
    "shapes_cells_tiny": ("shapes/captions_tiny", _cells_view),
}
DATASETS |= {view: SHAPES_PREPARERS[src.replace("/", "_")] for view, (src, _) in VIEWS.items()}

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

    source_name, view = VIEWS.get(name, (name, None))
    source = _data_source(source_name, os.fspath(data_cfg.data_dir), split)
    if shuffle is None:
        shuffle = bool(data_cfg.shuffle) and _split_name(split) == "train"

    ds = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        ds = ds.seed(data_cfg.seed).shuffle()
    ds = ds.repeat(num_epochs)  # Reseeds the shuffle each epoch.
    if view:
        ds = ds.map(view)
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
    # Builder configs live under "<builder>/<config>"; the prepare CLI names them with "_".
    # Users' own data (real formats) is built from their files by the formats CLI instead.
    if name.split("/")[0] in formats.BUILDER_NAMES.values():
        fix = (
            "build it from your files with `python -m pretzel_jax.data.formats <format> --src "
            f"PATH --data_dir {data_dir} --name ...` or set config.data.data_dir"
        )
    else:
        fix = (
            f"run `python -m pretzel_jax.data.prepare --name {name.replace('/', '_')} "
            f"--data_dir {data_dir}` or set config.data.data_dir"
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


# --- curriculum stage pipelines over the shared multimodal schema -----------------------------
#
#   per recipe: source -> this process's shard -> shuffle -> repeat -> decode_record -> recipe
#   -> weighted mixture of recipes -> windows of `pack_window` documents -> layout + first-fit
#   packing (a window becomes n >= 1 packed sequences) -> iterator (threads) -> worker processes
#   -> rebatch to `batch_size` sequences (in this process)
#
# Everything up to the packed windows is a random-access MapDataset, so workers split windows
# between them and the batches are the same for any `num_workers`; the rebatch state (which
# window, how far into it) is checkpointed with the rest.

# recipe -> which `datasets` entry it reads. A recipe turns a record into a training document:
#   t2i:         caption record as text-to-image (caption dropout to the empty prompt)
#   caption:     caption record as captioning chat: user = the image (+ `caption_prompt`),
#                assistant = the caption (the target)
#   caption_text: caption record as a text-only document (the caption, a plain text target)
#   vqa, interleaved, edit, text: the records as they are
RECIPES = {
    "t2i": "caption",
    "caption": "caption",
    "caption_text": "caption",
    "vqa": "vqa",
    "interleaved": "interleaved",
    "edit": "edit",
    "text": "text",
}
STAGE_WEIGHTS = {
    0: dict(caption=0.3, vqa=0.6, caption_text=0.1),  # toy scale: pretrain the VLM itself
    1: dict(t2i=1.0),
    2: dict(caption=1.0, vqa=1.0),
    3: dict(t2i=0.3, caption=0.1, vqa=0.2, interleaved=0.25, edit=0.15),
}


def stage_config(stage: int = 3, **overrides: Any) -> ml_collections.ConfigDict:
    """The data config of curriculum `stage` (0..3) with every default, then `overrides`.

    Keys:
      stage: 0 (toy scale) VLM pretraining: captioning + VQA + text-only captions; 1
        text-to-image, 2 captioning + VQA, 3 weighted mixture of every recipe.
      data_dir: the TFDS data dir holding the prepared data sets.
      datasets: record task -> TFDS name ("shapes/captions"; "" = not available).
      weights: recipe -> mixture weight (0 = unused); defaults from STAGE_WEIGHTS.
      tokenizer_dir: folder of tokenizer.json; "" = the one saved beside the first used data set.
      batch_size: packed sequences per step (global; each process gets batch_size // count).
      seq_len, latent_grid, image_size, max_images, spatial_merge_size, vlm_grid_stride:
        `layout.LayoutConfig`.
      caption_dropout: fraction of t2i captions replaced by "" (the unconditional prompt for CFG).
      caption_variants: t2i/caption recipes pick a caption uniformly from the record's scene
        JSON "captions" list (when there is one) instead of always the record's text.
      caption_prompt: user text after the image in the captioning recipe ("" = image only).
      vqa_questions, vqa_branches: fresh questions per VQA image (`_vqa`); branched, each
        question sees the image but not the other questions (stage-0 VLM only).
      pack_window: documents packed together; larger packs tighter, costs more per element.
      num_workers: worker processes (0 = this process). seed: all randomness. shuffle: shuffle
        "train" splits. drop_remainder: with num_epochs set, drop the last partial batch.
      train_split, eval_split, eval_batch_size: what the training loop reads for training and
        for its periodic eval.
    """
    if stage not in STAGE_WEIGHTS:
        raise ValueError(
            f"config.data.stage must be one of {sorted(STAGE_WEIGHTS)}, got {stage!r}."
        )
    weights = {recipe: 0.0 for recipe in RECIPES}
    weights.update(STAGE_WEIGHTS[stage])
    cfg = ml_collections.ConfigDict(
        dict(
            stage=stage,
            data_dir="",
            datasets=dict(
                caption="shapes/captions",
                vqa="shapes/vqa",
                interleaved="shapes/interleaved",
                edit="shapes/edits",
                text="",
            ),
            weights=weights,
            tokenizer_dir="",
            batch_size=8,
            seq_len=512,
            latent_grid=(8, 8),
            image_size=(32, 32),
            max_images=0,
            spatial_merge_size=2,
            vlm_grid_stride=1,
            caption_dropout=0.1 if stage in (1, 3) else 0.0,
            caption_variants=True,
            caption_prompt="",
            vqa_questions=0,  # > 0: that many fresh questions per VQA image, asked of its scene
            vqa_branches=False,  # True: each of those asked of the image alone (layout branches)
            pack_window=64,
            num_workers=0,
            seed=0,
            shuffle=True,
            drop_remainder=True,
            train_split="train",
            eval_split="test",
            eval_batch_size=8,
        )
    )
    for key, value in overrides.items():
        _check_keys({key: value}, cfg, "config.data")
        if isinstance(value, Mapping):
            _check_keys(value, cfg[key], f"config.data.{key}")
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def batch_shapes(data_cfg: ml_collections.ConfigDict) -> dict[str, tuple[tuple, np.dtype]]:
    """(shape, dtype) of each array of one global train batch: a stage pipeline's from its
    layout (no data read), any other data set's from its first batch (its data must exist)."""
    n = int(data_cfg.batch_size)
    if "stage" in data_cfg:
        return layout.packed_shapes(_layout_config(data_cfg), n)
    batch = next(make_iterator(data_cfg, data_cfg.train_split, shuffle=False))
    return {k: ((n, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in batch.items()}


def make_stage_iterator(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
) -> grain.DatasetIterator:
    """Returns a checkpointable iterator of packed batches of stage `data_cfg.stage`.

    Yields dicts of numpy arrays with a leading per-process batch dim: the packed arrays of
    `pretzel_jax.data.layout` (tokens (b, seq_len), images (b, max_images, H, W, 3), ...), fixed
    shapes. `it.get_state()` / `it.set_state()` resume exactly (also through Orbax, as
    `make_iterator`). `num_epochs`: None repeats forever; with an integer the mixture stops when
    its first recipe runs out (grain's mix). `shuffle`: defaults to `data_cfg.shuffle` for
    "train" splits and False otherwise.
    """
    windows = packed_windows(data_cfg, split, process_index, process_count, num_epochs, shuffle)
    it_ds = windows.to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    if data_cfg.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    local_batch_size = _local_batch_size(data_cfg.batch_size, process_count)
    it_ds = grain.experimental.RebatchIterDataset(
        it_ds, local_batch_size, drop_remainder=bool(data_cfg.drop_remainder)
    )
    return iter(it_ds)


def make_layout(data_cfg: ml_collections.ConfigDict) -> layout.Layout:
    """The `Layout` (tokenizer + LayoutConfig) the stage pipeline of `data_cfg` uses."""
    _check_stage_config(data_cfg)
    return layout.Layout(_load_tokenizer(data_cfg), _layout_config(data_cfg))


def stage_documents(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
) -> grain.MapDataset:
    """The mixture of training documents (`schema.Document`, after the recipes) the stage pipeline
    lays out and packs, as a random-access dataset (inspection, tests, evaluation)."""
    _check_stage_config(data_cfg)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
    data_dir = os.fspath(data_cfg.data_dir)
    if shuffle is None:
        shuffle = bool(data_cfg.shuffle) and _split_name(split) == "train"
    components, weights = [], []
    for recipe, weight in _used_weights(data_cfg).items():
        name = data_cfg.datasets[RECIPES[recipe]]
        ds = grain.MapDataset.source(_data_source(name, data_dir, split))
        ds = ds[process_index::process_count]
        if shuffle:
            ds = ds.seed(_derived_seed(data_cfg.seed, "shuffle", recipe)).shuffle()
        ds = ds.repeat(num_epochs).map(schema.decode_record)
        transform = functools.partial(
            _RECIPE_FNS[recipe], data_cfg=_recipe_options(data_cfg), dataset=name
        )
        seed = _derived_seed(data_cfg.seed, "recipe", recipe, process_index)
        components.append(ds.random_map(transform, seed=seed))
        weights.append(weight)
    if len(components) == 1:
        return components[0]
    return grain.MapDataset.mix(components, weights)


def packed_windows(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
) -> grain.MapDataset:
    """Random-access dataset of packed windows: element k holds the n >= 1 packed sequences
    (leading dim n) of documents [k * pack_window, (k + 1) * pack_window) of `stage_documents`."""
    docs = stage_documents(
        data_cfg,
        split,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
    )
    _local_batch_size(data_cfg.batch_size, process_count)  # fail before any work
    if data_cfg.pack_window < 1:
        raise ValueError(f"config.data.pack_window must be >= 1, got {data_cfg.pack_window}.")
    windows = docs.batch(data_cfg.pack_window, batch_fn=list)
    return windows.map(_PackWindow(make_layout(data_cfg)))


class _PackWindow:
    """Lays out and packs one window of documents (a picklable callable for worker processes)."""

    def __init__(self, lay: layout.Layout):
        self.layout = lay

    def __call__(self, docs: list[schema.Document]) -> dict[str, np.ndarray]:
        return self.layout.pack([self.layout.document(doc) for doc in docs])


# -- recipes ----------------------------------------------------------------------------------


def _recipe_options(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    # A plain dict: cheap to pickle into workers, and recipes never see unrelated keys.
    return dict(
        caption_dropout=float(data_cfg.caption_dropout),
        caption_variants=bool(data_cfg.caption_variants),
        caption_prompt=str(data_cfg.caption_prompt),
        vqa_questions=int(data_cfg.vqa_questions),
        vqa_branches=bool(data_cfg.vqa_branches),
    )


def _caption_parts(
    doc: schema.Document, rng: np.random.Generator, options: dict, dataset: str
) -> tuple[str, schema.Segment]:
    """(caption text, image segment) of a caption record, the caption maybe a random variant."""
    texts = [s for s in doc.segments if s.kind == schema.KIND_TEXT]
    images = [s for s in doc.segments if s.kind == schema.KIND_IMAGE]
    if len(texts) != 1 or len(images) != 1:
        raise ValueError(
            f"record {doc.id!r} of {dataset}: a caption record needs one text and one image "
            f"segment, it has {len(texts)} and {len(images)}; check config.data.datasets."
        )
    caption = texts[0].text
    if options["caption_variants"] and doc.scene:
        try:
            scene = json.loads(doc.scene)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"record {doc.id!r} of {dataset}: scene is not valid JSON ({e}); rebuild the data "
                "set or set config.data.caption_variants = False."
            ) from e
        variants = scene.get("captions") if isinstance(scene, dict) else None
        if variants:
            caption = str(variants[rng.integers(len(variants))])
    return caption, images[0]


def _t2i(doc: schema.Document, rng: np.random.Generator, data_cfg: dict, dataset: str):
    caption, image = _caption_parts(doc, rng, data_cfg, dataset)
    if rng.random() < data_cfg["caption_dropout"]:
        caption = ""
    segments = (
        schema.Segment.of_text(caption),
        schema.Segment.of_image(image.image, target=True),
    )
    return dataclasses.replace(doc, segments=segments)


def _captioning(doc: schema.Document, rng: np.random.Generator, data_cfg: dict, dataset: str):
    caption, image = _caption_parts(doc, rng, data_cfg, dataset)
    segments = [schema.Segment.of_image(image.image, role=schema.ROLE_USER)]
    if data_cfg["caption_prompt"]:
        segments.append(schema.Segment.of_text(data_cfg["caption_prompt"], role=schema.ROLE_USER))
    segments.append(schema.Segment.of_text(caption, role=schema.ROLE_ASSISTANT, target=True))
    return dataclasses.replace(doc, segments=tuple(segments))


def _as_is(task: str):
    def recipe(doc: schema.Document, rng: np.random.Generator, data_cfg: dict, dataset: str):
        del rng, data_cfg
        if doc.task != task:
            raise ValueError(
                f"record {doc.id!r} of {dataset} has task {doc.task!r}, but that data set is "
                f"configured as config.data.datasets.{task}; point it at a {task!r} data set."
            )
        return doc

    return recipe


def _vqa(doc: schema.Document, rng: np.random.Generator, data_cfg: dict, dataset: str):
    """The record as it is, or with `vqa_questions` fresh questions about its scene: each pass
    over the data asks new ones, and each image (66 tokens at toy scale) carries more answers.
    With `vqa_branches` each question is a branch (`Document.branches`): asked of the image
    alone, as the report and a chat user ask, not after the other questions (the stage-0 A/Bs
    behind this are in README.md, Results)."""
    doc = _as_is("vqa")(doc, rng, data_cfg, dataset)
    n = data_cfg["vqa_questions"]
    if not n:
        return doc
    try:
        (scene,) = json.loads(doc.scene)["images"]
        scene = SceneSpec.from_dict(scene)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"record {doc.id!r} of {dataset}: config.data.vqa_questions={n} asks new questions "
            f"of the record's scene, but it has no single shapes scene ({e!r}); set "
            "config.data.vqa_questions = 0 for data sets without one."
        ) from e
    images = tuple(s for s in doc.segments if s.kind == schema.KIND_IMAGE)
    qa = qa_segments(ask_many(scene, rng, n))
    if data_cfg["vqa_branches"]:  # each question asked of the image alone, as the report asks
        return dataclasses.replace(doc, segments=images, branches=tuple(zip(qa[::2], qa[1::2])))
    return dataclasses.replace(doc, segments=(*images, *qa))


def _caption_text(doc: schema.Document, rng: np.random.Generator, data_cfg: dict, dataset: str):
    caption, _ = _caption_parts(doc, rng, data_cfg, dataset)
    return dataclasses.replace(doc, segments=(schema.Segment.of_text(caption, target=True),))


_RECIPE_FNS = {
    "t2i": _t2i,
    "caption": _captioning,
    "caption_text": _caption_text,
    "vqa": _vqa,
    **{recipe: _as_is(recipe) for recipe in ("interleaved", "edit", "text")},
}


# -- config -----------------------------------------------------------------------------------


def _check_keys(given: Mapping[str, Any], known: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise KeyError(f"{where} has unknown keys {unknown}; known: {sorted(known)}.")


def _check_stage_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Unknown and missing keys fail naming the key (config.data.stage picks the defaults)."""
    if "stage" not in data_cfg:
        raise KeyError("config.data is missing 'stage' (0..3); start from stage_config().")
    defaults = stage_config(data_cfg.stage)
    for where, cfg, known in (
        ("config.data", data_cfg, defaults),
        ("config.data.datasets", data_cfg.get("datasets", {}), defaults.datasets),
        ("config.data.weights", data_cfg.get("weights", {}), defaults.weights),
    ):
        _check_keys(cfg, known, where)
        missing = sorted(set(known) - set(cfg))
        if missing:
            raise KeyError(f"{where} is missing {missing}; start from stage_config().")
    if not 0.0 <= data_cfg.caption_dropout <= 1.0:
        raise ValueError(
            f"config.data.caption_dropout must be in [0, 1], got {data_cfg.caption_dropout}."
        )
    if data_cfg.vqa_branches and data_cfg.vqa_questions <= 0:
        raise ValueError(
            "config.data.vqa_branches branches the fresh questions; set config.data.vqa_questions "
            "> 0 too."
        )


def _used_weights(data_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    weights = {recipe: float(w) for recipe, w in data_cfg.weights.items() if w}
    negative = {recipe: w for recipe, w in weights.items() if w < 0}
    if negative or not weights:
        raise ValueError(
            f"config.data.weights must be >= 0 with at least one > 0, got {dict(data_cfg.weights)}."
        )
    for recipe in weights:
        if not data_cfg.datasets[RECIPES[recipe]]:
            raise ValueError(
                f"config.data.weights.{recipe} is {weights[recipe]} but "
                f"config.data.datasets.{RECIPES[recipe]} is empty; name its TFDS data set or set "
                "the weight to 0."
            )
    return dict(sorted(weights.items(), key=lambda kv: list(RECIPES).index(kv[0])))


def _layout_config(data_cfg: ml_collections.ConfigDict) -> layout.LayoutConfig:
    return layout.LayoutConfig(
        seq_len=int(data_cfg.seq_len),
        latent_grid=tuple(data_cfg.latent_grid),
        image_size=tuple(data_cfg.image_size),
        max_images=int(data_cfg.max_images),
        spatial_merge_size=int(data_cfg.spatial_merge_size),
        vlm_grid_stride=int(data_cfg.vlm_grid_stride),
    )


def _load_tokenizer(data_cfg: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
    folder = data_cfg.tokenizer_dir
    if not folder:  # the tokenizer saved beside the first data set the stage reads
        recipe = next(iter(_used_weights(data_cfg)))
        name = data_cfg.datasets[RECIPES[recipe]]
        data_dir = os.fspath(data_cfg.data_dir)
        try:
            folder = read_only_builder.builder_from_files(name, data_dir=data_dir).data_dir
        except tfds.core.DatasetNotFoundError as e:
            raise FileNotFoundError(
                f"Data set {name!r} not found under {data_dir} (looking for its tokenizer): "
                f"run `python -m pretzel_jax.data.prepare --name {name.replace('/', '_')} "
                f"--data_dir {data_dir}` or set config.data.tokenizer_dir."
            ) from e
    path = os.path.join(os.fspath(folder), "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no tokenizer.json in {folder}; set config.data.tokenizer_dir to the folder holding "
            "the data set's tokenizer.json."
        )
    return tokenizers.Tokenizer.from_file(path)


def _derived_seed(seed: int, *parts: Any) -> int:
    """A seed for one named use of `seed`, stable across runs and Python versions."""
    return int(np.random.SeedSequence([seed, *(zlib.crc32(str(p).encode()) for p in parts)])
               .generate_state(1)[0])  # fmt: skip
