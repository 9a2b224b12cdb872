"""Device mesh from `config.mesh` (`data`, `fsdp`, `tensor`; one of them may be -1)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from pretzel_jax.nn.sharding import MESH_AXES
from pretzel_jax.train.errors import ConfigError


def mesh_shape(mesh_cfg: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Axis sizes with the -1 wildcard filled in from `device_count`."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(
                f"mesh.{axis}={size}: a mesh size must be positive, or -1 for 'all remaining "
                "devices'"
            )
    wildcards = [axis for axis, size in sizes.items() if size == -1]
    if len(wildcards) > 1:
        raise ConfigError(
            f"mesh.{wildcards[0]} and mesh.{wildcards[1]} are both -1; at most one mesh axis may "
            "be -1 (set the others to explicit sizes)"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    product = " * ".join(f"mesh.{a}" for a in MESH_AXES)
    if wildcards:
        if device_count % fixed:
            raise ConfigError(
                f"mesh.{wildcards[0]}=-1 cannot fill {device_count} devices: the other mesh axes "
                f"multiply to {fixed}, which does not divide {device_count}; change their sizes"
            )
        sizes[wildcards[0]] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"{product} = {fixed} but there are {device_count} devices; make the product "
            f"{device_count} or set one axis to -1"
        )
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all) with Auto axis types, so XLA
    propagates the shardings annotated on params and batches (GSPMD style)."""
    count = len(devices) if devices is not None else jax.device_count()
    sizes = mesh_shape(mesh_cfg, count)
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )
