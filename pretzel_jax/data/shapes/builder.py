"""TFDS builder of the shapes family, written without TensorFlow (array_record), shared schema.

Configs (one per task; each also in a `<name>_tiny` variant of a few records per split, for tests):
  captions     caption records (text -> image; all true caption variants in the scene JSON)
  vqa          image + question/answer turns on colour, shape, count, position, yes/no
  interleaved  documents of 2-4 images, each changed from the one before ("now the circle ...")
  edits        source image, instruction, target image (recolour, move, add, remove)

Splits: train / validation / test (no scene holds a `HELDOUT_COMBOS` (shape, colour) pair) and
heldout (every scene holds one). Record i of a split is drawn from a generator seeded by
(config seed, split, i) alone, so a build is deterministic and independent of write order.

The shapes word tokenizer (`pretzel_jax.data.tokenizer`, vocabulary `tasks.WORDS`) is saved
beside the records: `<data_dir>/shapes/<config>/<version>/tokenizer.json` (see `tokenizer_dir`).

Build: `prepare(data_dir, "captions")`; read: `tfds.data_source("shapes/captions", data_dir=...)`
and `pretzel_jax.data.schema.decode_record`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pretzel_jax.data import schema
from pretzel_jax.data.shapes.tasks import TASK_GENERATORS, WORDS
from pretzel_jax.data.tokenizer import build_word_tokenizer

NAME = "shapes"
SPLITS = ("train", "validation", "test", "heldout")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """One task of the family, with its sizes. A custom config needs a name of its own."""

    task: str = "caption"  # a key of tasks.TASK_GENERATORS
    image_size: int = 32
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000
    num_heldout: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASK_GENERATORS:
            raise ValueError(
                f"ShapesConfig {self.name!r}: task {self.task!r} is not one of "
                f"{sorted(TASK_GENERATORS)}."
            )

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: getattr(self, f"num_{split}") for split in SPLITS}


_TASKS = {"captions": "caption", "vqa": "vqa", "interleaved": "interleaved", "edits": "edit"}
TINY = dict(num_train=12, num_validation=4, num_test=4, num_heldout=4)


def _configs() -> list[ShapesConfig]:
    configs = []
    for name, task in _TASKS.items():
        configs.append(ShapesConfig(name=name, task=task, description=f"shapes {task} records"))
        configs.append(
            ShapesConfig(name=f"{name}_tiny", task=task, description=f"tiny {name}", **TINY)
        )
    return configs


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The shapes family as TFDS data sets (see the module docstring).

    `skip_registration`, `code_path` and the inline `DatasetInfo`: as in `pretzel_jax.data.digits`
    (reading goes through the files on disk; no TFDS package metadata).
    """

    name = NAME
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Captions, VQA, interleaved and edit configs; heldout split."}
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Synthetic shapes scenes (1-3 coloured shapes on a 3x3 grid) with exact ground "
                f"truth; task {self.builder_config.task!r}, "
                f"{self.builder_config.image_size}px images."
            ),
            features=schema.features(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing to download: every record is drawn from a seed.
        # During download_and_prepare, data_dir is the temporary folder that becomes the data
        # set folder, so the tokenizer lands (or not) together with the records.
        build_word_tokenizer(sorted(WORDS), self.data_dir)
        return {
            split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes.items()
        }

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        generate = TASK_GENERATORS[cfg.task]
        for i in range(n):
            rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
            record = generate(f"scene-{split}-{i:06d}", rng, cfg.image_size, split == "heldout")
            yield i, record


def tokenizer_dir(data_dir: str | os.PathLike, config: str) -> epath.Path:
    """The folder holding the tokenizer of built config `config` (for `load_word_tokenizer`)."""
    return Shapes(data_dir=os.fspath(data_dir), config=config).data_path


def prepare(data_dir: str | os.PathLike, config: str | ShapesConfig = "captions") -> None:
    """Builds shapes config `config` (a name in `Shapes.BUILDER_CONFIGS` or a custom
    `ShapesConfig`) under `data_dir/shapes/<config>/<version>/` unless it is already there."""
    builder = Shapes(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()


# For the prepare CLI's registry: data set name -> prepare(data_dir).
PREPARERS: dict[str, Callable[[str], None]] = {
    f"{NAME}_{cfg.name}": functools.partial(prepare, config=cfg.name) for cfg in _configs()
}
