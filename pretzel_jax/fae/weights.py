"""FAE weights as one safetensors file: every parameter under its "/"-joined path
("latent_encoder/out/kernel", "latent_norm/std", "encoder/tower/..."), and the FAE config as
JSON metadata. The latent normalisation statistics travel in it, so `encode` of a loaded FAE
gives the latents the flow was trained on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

FORMAT = "pretzel_jax.fae/1"


class FAEWeightsError(ValueError):
    """An FAE weights file that is missing, corrupt or does not fit the model."""


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param).to_pure_dict()
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[f"{prefix}{k}"] = np.asarray(v)

    walk(state, "")
    return flat


def save(model: nnx.Module, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(model.cfg))}
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in flat_params(model).items()}, str(tmp), meta)
    tmp.replace(path)
    return path


def read(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an FAE weights file (numpy), with one clear error naming the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FAEWeightsError(f"FAE weights {path} must be a .safetensors file (never a pickle)")
    if not path.is_file():
        raise FAEWeightsError(
            f"FAE weights {path} do not exist; train phase 'feature' first (its run folder "
            "holds fae.safetensors) and point model.fae.init_from at it"
        )
    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise FAEWeightsError(f"{path} is not an FAE weights file (format {FORMAT})")
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise FAEWeightsError(
            f"FAE weights {path} are unreadable ({e}): truncated or corrupt; rerun the phase "
            "'feature' report or copy the file again"
        ) from None


def load_into(model: nnx.Module, tensors: dict[str, np.ndarray], source: str | Path) -> None:
    """Set every parameter of `model` from `tensors` (names and shapes must match exactly).
    Works inside a trace too (the model's params may be tracers; the file's become constants)."""
    state = nnx.state(model, nnx.Param).to_pure_dict()
    ours = {
        "/".join(str(getattr(k, "key", k)) for k in p): v
        for p, v in jax.tree_util.tree_leaves_with_path(state)
    }
    missing = sorted(set(ours) - set(tensors))
    extra = sorted(set(tensors) - set(ours))
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(ours[k].shape)}"
        for k in ours
        if k in tensors and tuple(tensors[k].shape) != tuple(ours[k].shape)
    ]
    if missing or extra or bad:
        raise FAEWeightsError(
            f"FAE weights {source} do not fit this model (missing {missing[:5]}, unexpected "
            f"{extra[:5]}, shape mismatches {bad[:5]}); the model.fae config (and encoder) "
            "must be the ones the file was trained with"
        )
    new = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(tensors["/".join(str(getattr(k, "key", k)) for k in p)], v.dtype),
        state,
    )
    nnx.update(model, new)
