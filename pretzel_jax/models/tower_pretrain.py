"""Kind "tower_pretrain": the `model.vlm.vision` tower with dense-label heads
(`pretzel_jax.vlm.tower_pretrain`), on `image_size` images of the shapes family; its report is
`pretzel_jax.eval.tower_report`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from pretzel_jax.models.common import defaults, make, vlm_config
from pretzel_jax.models.registry import ModelKind, register
from pretzel_jax.vlm.tower_pretrain import TowerPretrain, TowerPretrainConfig

_NOT_MODEL_KEYS = ("report_batches",)


def default_config() -> dict:
    from pretzel_jax.data.shapes.scene import CELL_LABEL_CLASSES, ROWS

    return defaults(TowerPretrainConfig) | dict(
        cell_grid=len(ROWS),
        cell_classes=CELL_LABEL_CLASSES,
        report_batches=8,  # eval batches per split in the end-of-run report
    )


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> TowerPretrain:
    kw = config.model.tower_pretrain.to_dict()
    for key in _NOT_MODEL_KEYS:
        del kw[key]
    kw["vision"] = vlm_config(config.model).vision
    return TowerPretrain(make(TowerPretrainConfig, kw, "model.tower_pretrain"), rngs=rngs)


def report(config: ml_collections.ConfigDict) -> Callable:
    from pretzel_jax.eval.tower_report import report

    return report


register(ModelKind("tower_pretrain", default_config, build, report))
