"""A module's parameters as one safetensors file: every parameter under its "/"-joined path
("blocks/attn/qkv/kernel"), a format tag and the module's config as JSON metadata. Loading checks
the tag, every name and every shape, and names the file and the fix on any mismatch."""

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


class ParamFileError(ValueError):
    """A parameter file that is missing, corrupt, of another format or does not fit the model."""


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param).to_pure_dict()
    return {_key(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def save(model: nnx.Module, path: str | Path, fmt: str) -> Path:
    """Writes `model`'s parameters (and `model.cfg`, when a dataclass) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt}
    if dataclasses.is_dataclass(getattr(model, "cfg", None)):
        meta["config"] = json.dumps(dataclasses.asdict(model.cfg))
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in flat_params(model).items()}, str(tmp), meta)
    tmp.replace(path)
    return path


def read(
    path: str | Path, fmt: str, what: str, missing_hint: str, error=ParamFileError
) -> dict[str, np.ndarray]:
    """All tensors of a `fmt` file (numpy). `what` names the file's kind in errors ("FAE
    weights"); `missing_hint` says how to make one."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise error(f"{what} {path} must be a .safetensors file (never a pickle)")
    if not path.is_file():
        raise error(f"{what} {path} do not exist; {missing_hint}")
    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("format") != fmt:
                raise error(f"{path} is not a file of {what} (format {fmt})")
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise error(
            f"{what} {path} are unreadable ({e}): truncated or corrupt; write the file again"
        ) from None


def load_into(
    model: nnx.Module,
    tensors: dict[str, np.ndarray],
    source: str | Path,
    what: str,
    mismatch_hint: str,
    error=ParamFileError,
) -> None:
    """Set every parameter of `model` from `tensors` (names and shapes must match exactly).
    Works inside a trace too (the model's params may be tracers; the file's become constants)."""
    state = nnx.state(model, nnx.Param).to_pure_dict()
    ours = {_key(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}
    missing = sorted(set(ours) - set(tensors))
    extra = sorted(set(tensors) - set(ours))
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(ours[k].shape)}"
        for k in ours
        if k in tensors and tuple(tensors[k].shape) != tuple(ours[k].shape)
    ]
    if missing or extra or bad:
        raise error(
            f"{what} {source} do not fit this model (missing {missing[:5]}, unexpected "
            f"{extra[:5]}, shape mismatches {bad[:5]}); {mismatch_hint}"
        )
    new = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(tensors[_key(p)], v.dtype), state
    )
    nnx.update(model, new)
