"""Kind "image_flow": the class-conditional image flow (`pretzel_jax.flow.image_flow`), sized by
`model.image_flow` and `model.flow`; its report is `pretzel_jax.eval.image_flow_report`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from pretzel_jax.flow.image_flow import ImageFlow, ImageFlowConfig
from pretzel_jax.models.common import defaults, flow_config, make
from pretzel_jax.models.registry import ModelKind, register
from pretzel_jax.train.errors import ConfigError


def default_config() -> dict:
    return defaults(ImageFlowConfig) | dict(image_shape=(8, 8, 1), patch_size=2, num_levels=17)


def image_flow_config(model_cfg: ml_collections.ConfigDict) -> ImageFlowConfig:
    kw = model_cfg.image_flow.to_dict()
    kw["image_shape"] = tuple(kw["image_shape"])
    h, w, c = kw["image_shape"]
    kw["flow"] = flow_config(model_cfg, kw["patch_size"] ** 2 * c)
    return make(ImageFlowConfig, kw, "model.image_flow")


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> ImageFlow:
    return ImageFlow(image_flow_config(config.model), rngs=rngs)


def report(config: ml_collections.ConfigDict) -> Callable:
    from pretzel_jax.eval.image_flow_report import report

    if config.model.report.bpd_examples < 0:  # checked at start, not after the training
        raise ConfigError(
            f"model.report.bpd_examples={config.model.report.bpd_examples}: use 0 for the "
            "whole split or a positive count"
        )
    return report


register(ModelKind("image_flow", default_config, build, report))
