"""Kind "fae": the FAE config section, the frozen representation encoder (a Qwen2.5-VL vision
tower or DINOv2, from a local Hugging Face folder, or a random frozen toy one), and
phase-"pixel_adapt" initialisation from a phase-"feature" run's weights; its report is
`pretzel_jax.eval.fae_report`. Here, not in `pretzel_jax.fae`, because it composes `fae`, `vlm` and
`convert`, which `fae` itself may not import."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from pretzel_jax.fae import weights
from pretzel_jax.fae.encoders import DinoV2, DinoV2Config, QwenVisionEncoder
from pretzel_jax.fae.model import FAE, FROZEN, FAEConfig
from pretzel_jax.models.common import default_vlm_config, defaults
from pretzel_jax.models.registry import ModelKind, register
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.vlm import VisionConfig
from pretzel_jax.vlm.image_processing import CLIP_MEAN, CLIP_STD
from pretzel_jax.vlm.vision import VisionTower

log = logging.getLogger(__name__)

ENCODERS = ("qwen_vision", "dinov2")
IF_MISSING = ("error", "random")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv2's


def toy_qwen_vision() -> dict:
    """experiments/shapes_fae.py's random fallback: the stage-0 VLM's tower config (32 px ->
    8x8x128 patch features before the merger)."""
    vision = dict(default_vlm_config()["vision"])
    vision["out_hidden_size"] = vision["out_hidden_size"] or vision["hidden_size"]
    return vision


def default_config() -> ml_collections.ConfigDict:
    fae = defaults(FAEConfig) | dict(
        image_size=32,
        # () = the encoder's own input normalisation (DINOv2: ImageNet; Qwen: CLIP).
        pixel_mean=(),
        pixel_std=(),
        encoder=dict(
            kind="qwen_vision",  # one of ENCODERS
            # A local HF folder: a Qwen2.5-VL (its vision tower) or a DINOv2 model.
            path="",
            # When `path` is empty or absent: "error", or "random" = a randomly initialised,
            # frozen encoder (toy runs before a pretrained one exists) of VisionConfig /
            # DinoV2Config fields `random` (a dict; None = that config's defaults).
            if_missing="error",
            random=None,
            # qwen_vision: how many of the tower's blocks to run (0 = all). A tower trained
            # briefly (stage 0 on CPU) keeps more pixel detail in its early blocks.
            layers=0,
        ),
        # Phase "pixel_adapt": the phase-"feature" run's fae.safetensors.
        init_from="",
        report=dict(images=512, stats_batches=16, judge=True, export=True),
    )
    return ml_collections.ConfigDict(fae)


@functools.lru_cache(maxsize=4)
def _pretrained(kind: str, path: str) -> tuple[object, dict]:
    """(encoder config, numpy params) from a local HF folder, read once per process."""
    from pretzel_jax.convert.safetensors_io import ConversionError

    try:
        # Build may run under a trace (eval_shape, jit): load with concrete arrays regardless.
        with jax.ensure_compile_time_eval():
            return _load_pretrained(kind, path)
    except (ConversionError, OSError, ValueError) as e:
        raise ConfigError(
            f"model.fae.encoder.path={path}: cannot load the {kind} encoder: {e}. Point it at a "
            "complete Hugging Face folder (config.json + model.safetensors) of that model"
        ) from e


def _load_pretrained(kind: str, path: str) -> tuple[object, dict]:
    from pretzel_jax.convert import hf_dinov2, hf_qwen25vl
    from pretzel_jax.convert.safetensors_io import ConversionError

    if kind == "dinov2":
        model = hf_dinov2.load(path)
        cfg = model.cfg
    else:
        vlm = hf_qwen25vl.load(path)
        if vlm.vision is None:
            raise ConversionError(f"{path} holds a text-only Qwen2 model: no vision tower")
        model, cfg = vlm.vision, vlm.vision.cfg
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    return cfg, params


def _encoder(enc_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    kind, path = enc_cfg.kind, enc_cfg.path
    if kind not in ENCODERS:
        raise ConfigError(f"model.fae.encoder.kind={kind!r} is unknown; use one of {ENCODERS}")
    if enc_cfg.if_missing not in IF_MISSING:
        raise ConfigError(f"model.fae.encoder.if_missing must be one of {IF_MISSING}")
    if path and Path(path).exists():
        cfg, params = _pretrained(kind, str(Path(path).resolve()))
    elif enc_cfg.if_missing == "random":
        _warn_random(kind, path)
        kw = enc_cfg.random or {}
        kw = kw.to_dict() if isinstance(kw, ml_collections.ConfigDict) else dict(kw)
        cfg = (DinoV2Config if kind == "dinov2" else VisionConfig)(**kw)
        params = None
    else:
        raise ConfigError(
            f"model.fae.encoder.path={path!r}: no {kind} encoder there; train or download it, "
            "or set model.fae.encoder.if_missing=random for a random frozen toy encoder"
        )
    if kind == "dinov2":
        if enc_cfg.layers:
            raise ConfigError("model.fae.encoder.layers applies to qwen_vision only; set it to 0")
        encoder = DinoV2(cfg, rngs=rngs)
        if params is not None:
            nnx.update(encoder, params)
        return encoder, cfg.patch_size, cfg.hidden_size
    cfg, params = _first_blocks(cfg, params, enc_cfg.layers)
    tower = VisionTower(cfg, rngs=rngs)
    if params is not None:
        nnx.update(tower, params)
    return QwenVisionEncoder(tower), cfg.patch_size, cfg.hidden_size


def _first_blocks(cfg: VisionConfig, params, layers: int):
    """The tower config and params cut to its first `layers` blocks (0 = all of them)."""
    if not layers:
        return cfg, params
    if not 0 < layers <= cfg.depth:
        raise ConfigError(
            f"model.fae.encoder.layers={layers} but the tower has {cfg.depth} blocks; use 0 "
            f"(all) or 1..{cfg.depth}"
        )
    full = tuple(i for i in cfg.fullatt_block_indexes if i < layers)
    cfg = dataclasses.replace(cfg, depth=layers, fullatt_block_indexes=full)
    if params is not None:
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x[:layers] if path[0].key == "blocks" else x, params
        )
    return cfg, params


@functools.lru_cache(maxsize=8)
def _warn_random(kind: str, path: str) -> None:
    log.warning(
        "FAE encoder: %s; using a RANDOMLY INITIALISED, FROZEN toy %s encoder "
        "(model.fae.encoder.random). Set model.fae.encoder.path to the stage-0 VLM's Hugging Face "
        "export for the real toy pipeline.",
        f"no weights at {path!r}" if path else "model.fae.encoder.path is empty",
        kind,
    )


def fae_config(model_cfg: ml_collections.ConfigDict, patch: int, feature_dim: int) -> FAEConfig:
    kw = {k: v for k, v in model_cfg.fae.to_dict().items() if k not in _NOT_FAE_KEYS}
    s = kw["feature_group"]
    kw["feature_grid"] = kw["image_size"] // (patch * s)
    kw["feature_dim"] = feature_dim * s * s
    own = (CLIP_MEAN, CLIP_STD) if model_cfg.fae.encoder.kind == "qwen_vision" else IMAGENET
    for key, default in zip(("pixel_mean", "pixel_std"), own, strict=True):
        kw[key] = tuple(kw[key]) or default
    try:
        return FAEConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model.fae: {e}") from e


_NOT_FAE_KEYS = ("encoder", "init_from", "report")


def check_freeze(config: ml_collections.ConfigDict) -> None:
    """The phase's frozen parts must be in optim.freeze (the loop freezes by regex)."""
    phase = config.model.fae.phase
    needed = [p for p in FROZEN.get(phase, ()) if p not in tuple(config.optim.freeze)]
    if needed:
        raise ConfigError(
            f"model.fae.phase={phase!r} trains only what it should when optim.freeze holds "
            f"{list(FROZEN[phase])}; add {needed} (pretzel_jax.fae.model.FROZEN)"
        )


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> FAE:
    check_freeze(config)
    fae_cfg = config.model.fae
    encoder, patch, dim = _encoder(fae_cfg.encoder, rngs=rngs)
    if fae_cfg.image_size % (patch * fae_cfg.feature_group):
        raise ConfigError(
            f"model.fae.image_size={fae_cfg.image_size} is not a multiple of the encoder's patch "
            f"size {patch} x model.fae.feature_group {fae_cfg.feature_group}"
        )
    model = FAE(fae_config(config.model, patch, dim), encoder, rngs=rngs)
    if fae_cfg.init_from:
        try:
            weights.load_into(model, _read(fae_cfg.init_from), fae_cfg.init_from)
        except weights.FAEWeightsError as e:
            raise ConfigError(f"model.fae.init_from: {e}") from e
    elif config.model.fae.phase == "pixel_adapt":
        raise ConfigError(
            "model.fae.phase='pixel_adapt' adapts a trained FAE: set model.fae.init_from to the "
            "phase-'feature' run's fae.safetensors"
        )
    return model


@functools.lru_cache(maxsize=4)
def _read(path: str) -> dict[str, np.ndarray]:
    return weights.read(path)


def freeze_patterns(phase: str) -> tuple[str, ...]:
    """What an experiment puts in optim.freeze for `phase`."""
    return FROZEN[phase]


def report(config: ml_collections.ConfigDict) -> Callable:
    from pretzel_jax.eval.fae_report import report

    return report


register(ModelKind("fae", default_config, build, report))
