"""Data: TFDS builders (array_record, no TensorFlow) for the digits set, the synthetic shapes
family (`data.shapes`) and users' own data (`data.formats`); the shared record schema; the
sequence layout; Grain input pipelines per curriculum stage."""

from pretzel_jax.data.layout import Layout, LayoutConfig
from pretzel_jax.data.pipeline import (
    DATASETS,
    batch_shapes,
    make_iterator,
    make_stage_iterator,
    prepare_dataset,
    stage_config,
)
from pretzel_jax.data.schema import Document, Segment, decode_record, make_record

__all__ = [
    "DATASETS",
    "batch_shapes",
    "Document",
    "Layout",
    "LayoutConfig",
    "Segment",
    "decode_record",
    "make_iterator",
    "make_record",
    "make_stage_iterator",
    "prepare_dataset",
    "stage_config",
]
