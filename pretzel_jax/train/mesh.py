"""Device mesh from `config.mesh` (`data`, `fsdp`, `tensor`; one of them may be -1)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
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
    propagates the shardings annotated on params and batches (GSPMD style). Devices of several
    slices (multi-slice TPU) split `data` across the slices (DCN) and every other axis within
    a slice (ICI)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if sizes["data"] % slices:
        raise ConfigError(
            f"mesh.data={sizes['data']}: the devices span {slices} slices and the data axis is "
            f"the one across slices (DCN); make mesh.data a multiple of {slices} "
            f"(e.g. --config.mesh.data={slices})"
        )
    ici = (sizes["data"] // slices, *shape[1:])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
