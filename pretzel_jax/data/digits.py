"""TFDS builder for scikit-learn's bundled 8x8 handwritten digits, written without TensorFlow.

The data ship inside scikit-learn, so this builder needs no network. Records are written as
`array_record` (the only TFDS format that needs no TF) and read back through
`tfds.data_source` / Grain.

Features:
  image: uint8 Tensor (8, 8, 1) holding the raw grey levels 0..16 (`NUM_LEVELS` values). A plain
         Tensor rather than `tfds.features.Image`, whose numpy encoding calls TF, and which would
         suggest a 0..255 range.
  label: ClassLabel with 10 classes (the digit).

Splits (1797 images in all), fixed by `SPLIT_SEED`:
  train: 1437, test: 360. The split is *stratified*: every class gives its share of the 360 test
  images (largest-remainder rounding), chosen by a seeded permutation within the class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "digits"
NUM_LEVELS = 17
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
NUM_TEST = 360
SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns sorted (train, test) index arrays with `num_test` test indices, stratified by label.

    Each class gets `num_test * class_count / total` test slots, rounded down, and the slots left
    over go to the classes with the largest fractional parts (ties to the smaller label), so the
    total is exactly `num_test`.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quotas = num_test * counts / counts.sum()
    per_class = np.floor(quotas).astype(np.int64)
    leftover = num_test - int(per_class.sum())
    # Stable sort on negated fractions: largest first, ties broken by class order.
    per_class[np.argsort(-(quotas - per_class), kind="stable")[:leftover]] += 1

    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[:n]
            for c, n in zip(classes, per_class, strict=True)
        ]
    )
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns {split: (images uint8 (n, 8, 8, 1), labels int64 (n,))} straight from scikit-learn.

    The builder writes exactly these arrays; tests compare against them.
    """
    from sklearn.datasets import load_digits  # Lazy: only building needs scikit-learn.

    digits = load_digits()
    images = digits.images.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    labels = digits.target.astype(np.int64)
    # load_digits gives float64 counts 0..16; the uint8 cast must lose nothing.
    if not np.array_equal(images.reshape(digits.images.shape), digits.images):
        raise ValueError("scikit-learn's load_digits no longer holds integer levels 0..16.")
    train, test = stratified_split(labels, NUM_TEST, SPLIT_SEED)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn `load_digits` as a TFDS data set (see the module docstring).

    `skip_registration`: reading goes through the files on disk (`builder_from_files`), so the
    global TFDS name registry is not needed, and skipping it avoids a name clash if this module is
    imported twice (e.g. as `__main__`).
    """

    name = NAME
    # TFDS derives this from the package and, for modules outside its own tree, needs the
    # `importlib_resources` backport (not installed) to do so. It is only used to look for a
    # checksums file next to the code; there is none, as nothing is downloaded.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version: stratified 1437/360 train/test split, seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` looks for package metadata that a module
        # outside the TFDS tree does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits: 8x8 grey images, levels 0..16, 10 classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        return {
            split: self._generate_examples(images, labels)
            for split, (images, labels) in load_split_arrays().items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield key, {"image": image, "label": int(label)}


def prepare(data_dir: str) -> None:
    """Builds the data set under `data_dir/digits/<version>/` unless it is already there."""
    builder = Digits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
