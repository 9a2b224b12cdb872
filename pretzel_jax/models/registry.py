"""The model-kind registry: a lookup from `config.model.kind` to a `ModelKind`.

Each kind registers itself from its own module (`register(ModelKind(...))` at import). The
modules of the `pretzel_jax.models` package are found with pkgutil and imported on demand, so a
new kind is one new file in the package; a kind of a user's own is registered by importing its
module before training (e.g. from the experiment file). This module imports no model code and
not its package's `__init__`, so the kind modules can import it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

import ml_collections
from flax import nnx

from pretzel_jax.train.errors import ConfigError

PACKAGE = "pretzel_jax.models"
# Modules of the package that hold no kind.
_NOT_KINDS = frozenset({"registry", "common"})


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One model kind.

    name: the `config.model.kind` that selects it.
    default_config: its section `config.model.<name>` (every knob with its default); None when
        the kind has no section of its own (it reads shared ones, e.g. `model.vlm`).
    build: build(config, rngs=rngs) -> an nnx.Module with `loss(batch, key)`.
    report: report(config) -> the end-of-run report fn(model, config, data, key, run_dir) ->
        dict, or None; called at start, so it may check config and raise ConfigError.
    weight_sources: weight_sources(config) -> the pretrained weight sources a trainer restores
        after init; None = none.
    """

    name: str
    default_config: Callable[[], dict | ml_collections.ConfigDict] | None
    build: Callable[..., nnx.Module]
    report: Callable[[ml_collections.ConfigDict], Callable | None] | None
    weight_sources: Callable[[ml_collections.ConfigDict], list] | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"ModelKind name {self.name!r}: use a Python identifier")
        if not callable(self.build):
            raise TypeError(f"ModelKind {self.name!r}: build must be callable")


_KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    """Adds `kind`; a second kind of the same name is an error."""
    if kind.name in _KINDS:
        raise ValueError(
            f"model kind {kind.name!r} is registered twice (by {_where(_KINDS[kind.name])} and "
            f"{_where(kind)}); give one of them another name"
        )
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> ModelKind:
    """The kind called `name`, importing its module of the package when not yet registered."""
    if name not in _KINDS and name in _package_modules():
        importlib.import_module(f"{PACKAGE}.{name}")
    if name not in _KINDS:  # registered under another name by some module of the package
        _import_all()
    if name not in _KINDS:
        raise ConfigError(
            f"config.model.kind={name!r} is unknown; use one of {list(kinds())} (a kind of your "
            f"own: a module that calls {PACKAGE}.register(ModelKind(...)), imported before "
            "training, e.g. by the experiment file)"
        )
    return _KINDS[name]


def kinds() -> tuple[str, ...]:
    """The names of every kind: the package's and those registered by other modules."""
    _import_all()
    return tuple(sorted(_KINDS))


def _package_modules() -> list[str]:
    here = str(Path(__file__).parent)
    return [
        m.name
        for m in pkgutil.iter_modules([here])
        if not m.name.startswith("_") and m.name not in _NOT_KINDS
    ]


def _import_all() -> None:
    for name in _package_modules():
        importlib.import_module(f"{PACKAGE}.{name}")


def _where(kind: ModelKind) -> str:
    return getattr(kind.build, "__module__", None) or "?"
