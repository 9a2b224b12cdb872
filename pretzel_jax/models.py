"""Model registry: config.model -> an nnx.Module with `loss(batch, key)`, plus its end-of-run
report. The only module that knows every model kind; train/ and sample/ stay generic."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
from flax import nnx

from pretzel_jax.flow import FlowConfig
from pretzel_jax.flow.image_flow import ImageFlow, ImageFlowConfig

KINDS = ("image_flow",)


def _defaults(cls) -> dict:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def default_model_config() -> ml_collections.ConfigDict:
    """Every model knob with its single default (the dataclasses hold the values)."""
    image = _defaults(ImageFlowConfig) | dict(image_shape=(8, 8, 1), patch_size=2, num_levels=17)
    # token_dim 0 = derived (patch_size^2 * channels); () permutations = the STARFlow default.
    flow = _defaults(FlowConfig) | dict(token_dim=0, permutations=())
    return ml_collections.ConfigDict(
        {
            "kind": "image_flow",
            "image_flow": image,
            "flow": flow,
            # End-of-run report (ImageFlow): CFG sample grid and held-out bits/dim.
            "report": {
                "guidance": 1.0,
                "samples_per_class": 10,
                "dequant_draws": 4,
                "split": "test",
            },
        }
    )


def flow_config(model_cfg: ml_collections.ConfigDict, token_dim: int) -> FlowConfig:
    kw = model_cfg.flow.to_dict()
    kw["token_dim"] = kw["token_dim"] or token_dim
    kw["permutations"] = tuple(kw["permutations"]) or None
    return _make(FlowConfig, kw, "model.flow")


def image_flow_config(model_cfg: ml_collections.ConfigDict) -> ImageFlowConfig:
    kw = model_cfg.image_flow.to_dict()
    kw["image_shape"] = tuple(kw["image_shape"])
    h, w, c = kw["image_shape"]
    kw["flow"] = flow_config(model_cfg, kw["patch_size"] ** 2 * c)
    return _make(ImageFlowConfig, kw, "model.image_flow")


def _make(cls, kw: dict, where: str):
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{where}: {e}") from e


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    kind = config.model.kind
    if kind == "image_flow":
        return ImageFlow(image_flow_config(config.model), rngs=rngs)
    raise ValueError(f"config.model.kind={kind!r} is unknown; use one of {KINDS}")


def report_fn(config: ml_collections.ConfigDict) -> Callable | None:
    """The end-of-run report for this model kind: fn(model, config, data, key, run_dir) -> dict."""
    if config.model.kind == "image_flow":
        from pretzel_jax.eval.image_flow_report import report

        return report
    return None
