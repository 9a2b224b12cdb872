"""Logical axis names -> mesh axes.

Model code names every parameter axis and the big activations with logical names (`batch`,
`length`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `latent`, `layers`, ...).
One rules table per config maps them to mesh axes (`data`, `fsdp`, `tensor`). Parameters carry
the names as `out_sharding` metadata (eager sharding off, so modules build anywhere); the train
state turns them into `NamedSharding`s with `named_shardings`. Activations are constrained with
`constrain`, which is a no-op unless a `sharding_context` is active (so CPU tests and plain calls
need no mesh).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None). MaxText-style defaults: parameters are
# FSDP-sharded on `embed`, tensor-parallel on heads/mlp/vocab; the batch uses data and fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("latent", None),
    ("layers", None),
    ("classes", None),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]
_CTX = threading.local()


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dim)."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {tuple(axes)} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_to_spec(
    axes: Sequence[str | None] | None,
    rules: Rules,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once per array, and (when
    `shape` and `mesh` are given) a dim that does not divide by its mesh axes stays replicated."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(
                f"logical axis {name!r} has no entry in the sharding rules; add it to "
                f"config.mesh.rules (known: {sorted(table)})"
            )
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh_axes and shape is not None and mesh is not None:
            size = 1
            for a in mesh_axes:
                size *= mesh.shape[a]
            if shape[i] % size:
                mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def _axes_of(variable) -> tuple[str | None, ...] | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get("out_sharding")


def named_shardings(state, mesh: Mesh, rules: Rules):
    """NamedSharding pytree (same structure as `state`, an nnx.State of Variables or of abstract
    arrays) from each Variable's logical axis metadata. Unannotated leaves are replicated."""

    def one(v):
        value = v.get_value() if hasattr(v, "get_value") else v
        spec = logical_to_spec(_axes_of(v), rules, getattr(value, "shape", None), mesh)
        return (
            v.replace(NamedSharding(mesh, spec))
            if hasattr(v, "replace")
            else NamedSharding(mesh, spec)
        )

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def undivided(state, mesh: Mesh, rules: Rules, min_bytes: int) -> list[str]:
    """The parameters of `state` (as for `named_shardings`) of at least `min_bytes` that stay
    replicated on a dim whose logical axis asks for mesh axes its size does not divide, one
    line each: such a parameter silently costs every device its full size."""
    problems = []
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, v in leaves:
        value = v.get_value() if hasattr(v, "get_value") else v
        axes, shape = _axes_of(v), getattr(value, "shape", None)
        if axes is None or shape is None:
            continue
        size = math.prod(shape) * jnp.dtype(value.dtype).itemsize
        wanted, got = logical_to_spec(axes, rules), logical_to_spec(axes, rules, shape, mesh)
        if size >= min_bytes and wanted != got:
            problems.append(
                f"{jax.tree_util.keystr(path, simple=True, separator='/')} {tuple(shape)} "
                f"{tuple(axes)}: wants {wanted}, "
                f"gets {got} on mesh {dict(mesh.shape)}"
            )
    return problems


@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules: Rules):
    """Activate activation constraints for code traced inside this block, and make the mesh the
    abstract mesh there, so kernel wrappers (`jax.sharding.get_abstract_mesh()`) can shard_map
    their opaque custom calls over it."""
    prev = getattr(_CTX, "value", None)
    _CTX.value = (mesh, tuple(rules)) if mesh is not None else None
    try:
        with contextlib.ExitStack() as stack:
            if mesh is not None:
                stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
            yield
    finally:
        _CTX.value = prev


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Hint the sharding of an activation by logical axes (no-op outside a sharding_context)."""
    ctx = getattr(_CTX, "value", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
