"""Models: config.model -> an nnx.Module with `loss(batch, key)`, plus its end-of-run report.

`config.model.kind` names a `ModelKind` in the registry (`registry.py`). Each kind registers
itself from its own module of this package (`image_flow.py`, `vlm.py`, `tower_pretrain.py`,
`fae.py`, ...), imported on demand: a new kind is a new module here that calls
`register(ModelKind(...))`, or a module of a user's own imported before training. train/ and
sample/ stay generic: they call `build`, `report_fn` and `weight_sources` below.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from pretzel_jax.models.common import (
    default_vlm_config,
    flow_config,
    shapes_vocab_size,
    shared_config,
    vlm_config,
)
from pretzel_jax.models.registry import ModelKind, get, kinds, register

__all__ = [
    "ModelKind",
    "build",
    "default_model_config",
    "default_vlm_config",
    "flow_config",
    "get",
    "image_flow_config",
    "kinds",
    "register",
    "report_fn",
    "shapes_vocab_size",
    "vlm_config",
    "weight_sources",
]

DEFAULT_KIND = "image_flow"


def default_model_config() -> ml_collections.ConfigDict:
    """config.model: `kind`, every registered kind's own section and the shared sections, each
    knob with its single default (the dataclasses hold the values)."""
    model = {"kind": DEFAULT_KIND}
    shared = shared_config()
    for name in kinds():
        kind = get(name)
        if kind.default_config is None:
            continue
        if name in shared or name == "kind":
            raise ValueError(
                f"model kind {name!r} has a section of its own but config.model.{name} is a "
                "shared section; give the kind another name or no default_config"
            )
        model[name] = kind.default_config()
    return ml_collections.ConfigDict(model | shared)


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model of kind config.model.kind."""
    return get(config.model.kind).build(config, rngs=rngs)


def report_fn(config: ml_collections.ConfigDict) -> Callable | None:
    """The end-of-run report for this model kind: fn(model, config, data, key, run_dir) -> dict,
    or None. Called at start: a bad report setting fails here."""
    kind = get(config.model.kind)
    return kind.report(config) if kind.report is not None else None


def weight_sources(config: ml_collections.ConfigDict) -> list:
    """The pretrained weight sources this kind's model restores after init ([] = none)."""
    kind = get(config.model.kind)
    return list(kind.weight_sources(config)) if kind.weight_sources is not None else []


def image_flow_config(model_cfg: ml_collections.ConfigDict):
    """config.model's image_flow and flow sections as an ImageFlowConfig."""
    from pretzel_jax.models.image_flow import image_flow_config as make_config

    return make_config(model_cfg)
