"""FAE weights as one safetensors file (`pretzel_jax.nn.param_file`): every parameter under its
"/"-joined path ("latent_encoder/out/kernel", "latent_norm/std", "encoder/tower/..."), and as
JSON metadata the FAE config ("config") and the frozen encoder's kind and config ("encoder":
{"kind": "dinov2" | "qwen_vision", "config": DinoV2Config / VisionConfig fields}), so that
`pretzel_jax.fae.load(path)` rebuilds the FAE from the file alone. Files written before the
"encoder" entry existed read the same; `fae.load` then needs the encoder's config passed in. The
latent normalisation statistics travel in the file, so `encode` of a loaded FAE gives the latents
the flow was trained on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pretzel_jax.fae.encoders import DinoV2, QwenVisionEncoder
from pretzel_jax.nn import param_file
from pretzel_jax.nn.param_file import flat_params

__all__ = [
    "FORMAT",
    "FAEWeightsError",
    "encoder_metadata",
    "flat_params",
    "load_into",
    "read",
    "read_metadata",
    "save",
]

FORMAT = "pretzel_jax.fae/1"
_WHAT = "FAE weights"


class FAEWeightsError(param_file.ParamFileError):
    """An FAE weights file that is missing, corrupt or does not fit the model."""


def encoder_metadata(encoder: nnx.Module) -> dict | None:
    """{"kind", "config"} of a DinoV2 or a QwenVisionEncoder (its tower's config, already cut
    to the blocks it runs); None for another encoder module (its config is not recorded)."""
    if isinstance(encoder, DinoV2):
        return {"kind": "dinov2", "config": dataclasses.asdict(encoder.cfg)}
    if isinstance(encoder, QwenVisionEncoder):
        return {"kind": "qwen_vision", "config": dataclasses.asdict(encoder.tower.cfg)}
    return None


def save(model: nnx.Module, path: str | Path) -> Path:
    """Writes the FAE's parameters, its config and its encoder's kind and config to `path`
    atomically (`param_file.save`'s layout plus the "encoder" metadata entry)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(model.cfg))}
    encoder = encoder_metadata(model.encoder)
    if encoder is not None:
        meta["encoder"] = json.dumps(encoder)
    tensors = {k: np.ascontiguousarray(v) for k, v in flat_params(model).items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> tuple[dict, dict | None]:
    """(FAE config fields, {"kind", "config"} of the encoder or None for a file written before
    that entry existed) of an FAE weights file, with one clear error naming the file."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        read(path)  # raises the missing-file / not-safetensors error
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise FAEWeightsError(
            f"{_WHAT} {path} are unreadable ({e}): truncated or corrupt; write the file again"
        ) from None
    if meta.get("format") != FORMAT:
        raise FAEWeightsError(f"{path} is not a file of {_WHAT} (format {FORMAT})")
    try:
        config = json.loads(meta["config"])
        encoder = json.loads(meta["encoder"]) if "encoder" in meta else None
    except (KeyError, ValueError) as e:
        raise FAEWeightsError(
            f"{_WHAT} {path}: the config metadata is missing or corrupt ({e!r}); write the file "
            "again with pretzel_jax.fae.weights.save"
        ) from None
    if encoder is not None and not (
        isinstance(encoder, dict) and set(encoder) == {"kind", "config"}
    ):
        raise FAEWeightsError(
            f"{_WHAT} {path}: the encoder metadata {str(encoder)[:80]} is not "
            '{"kind": ..., "config": {...}}; write the file again with pretzel_jax.fae.weights.save'
        )
    return config, encoder


def read(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an FAE weights file (numpy), with one clear error naming the file."""
    hint = (
        "train phase 'feature' first (its run folder holds fae.safetensors) and point "
        "model.fae.init_from at it"
    )
    return param_file.read(path, FORMAT, _WHAT, hint, FAEWeightsError)


def load_into(model: nnx.Module, tensors: dict[str, np.ndarray], source: str | Path) -> None:
    """Set every parameter of `model` from `tensors` (names and shapes must match exactly)."""
    hint = "the model.fae config (and encoder) must be the ones the file was trained with"
    param_file.load_into(model, tensors, source, _WHAT, hint, FAEWeightsError)
