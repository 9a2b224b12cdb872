"""FAE weights as one safetensors file (`pretzel_jax.nn.param_file`): every parameter under its
"/"-joined path ("latent_encoder/out/kernel", "latent_norm/std", "encoder/tower/..."), and the
FAE config as JSON metadata. The latent normalisation statistics travel in it, so `encode` of a
loaded FAE gives the latents the flow was trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from pretzel_jax.nn import param_file
from pretzel_jax.nn.param_file import flat_params

__all__ = ["FORMAT", "FAEWeightsError", "flat_params", "load_into", "read", "save"]

FORMAT = "pretzel_jax.fae/1"
_WHAT = "FAE weights"


class FAEWeightsError(param_file.ParamFileError):
    """An FAE weights file that is missing, corrupt or does not fit the model."""


def save(model: nnx.Module, path: str | Path) -> Path:
    return param_file.save(model, path, FORMAT)


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
