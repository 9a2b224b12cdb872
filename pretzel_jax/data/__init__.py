"""Data: TFDS builders (array_record, no TensorFlow) and Grain input pipelines."""

from pretzel_jax.data.pipeline import DATASETS, make_iterator, prepare_dataset

__all__ = ["DATASETS", "make_iterator", "prepare_dataset"]
