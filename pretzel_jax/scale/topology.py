"""TPU slices by their Cloud names (v4-8, v5p-128, v5e-256, v6e-256) -> compile-only devices.

`jax.experimental.topologies.get_topology_desc` returns the devices of a slice that does not
exist here, so a program can be compiled (not run) for it on any host where `libtpu` is
installed (`pip install -r requirements-tpu.txt`). Chip figures are Google Cloud's published
per-chip numbers (bf16 peak, HBM bandwidth, ICI bandwidth); the HBM capacity is what XLA reports
as available to a program (from its RESOURCE_EXHAUSTED messages).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str  # the Cloud name's prefix
    platform_name: str  # the topology name's prefix for get_topology_desc
    chip_config: str
    cores_per_name_unit: int  # v4-8 / v5p-8 count TensorCores (2 per chip), v5e / v6e chips
    hbm_bytes: int  # per chip, as XLA budgets it
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bytes/s per chip, all links
    torus: bool  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 2, int(30.75 * GIB), 275e12, 1.2e12, 300e9, True),
    "v5p": Chip("v5p", "v5", "megacore", 2, int(95.74 * GIB), 459e12, 2.765e12, 600e9, True),
    "v5e": Chip("v5e", "v5e", "default", 1, int(15.75 * GIB), 197e12, 0.819e12, 200e9, False),
    "v6e": Chip("v6e", "v6e", "default", 1, int(31.25 * GIB), 918e12, 1.64e12, 400e9, False),
}
# chips -> the slice's shape (3-D for v4/v5p, 2-D for v5e/v6e), as Cloud builds them.
_SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_SHAPES_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}


class TopologyError(ValueError):
    """A slice name that is not a TPU slice Cloud offers, or libtpu missing."""


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices


def parse(name: str, num_slices: int = 1) -> Slice:
    """'v5p-128' -> Slice(v5p, (4, 4, 4)); v4 and v5p count TensorCores (2 per chip), v5e and
    v6e chips (Cloud's naming). `v5litepod-N` is v5e-N."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    known = sorted({f"{f}-{n * CHIPS[f].cores_per_name_unit}" for f in CHIPS for n in (4, 64)})
    if not m:
        raise TopologyError(
            f"--topology {name!r} is not a TPU slice name; use one like {', '.join(known)}"
        )
    family = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    chip = CHIPS[family]
    units = int(m.group(2))
    shapes = _SHAPES_3D if chip.torus else _SHAPES_2D
    chips, rem = divmod(units, chip.cores_per_name_unit)
    if rem or chips not in shapes:
        sizes = [n * chip.cores_per_name_unit for n in shapes]
        raise TopologyError(
            f"--topology {name!r}: {family} slices come as {family}-N, N in {sizes}"
        )
    if num_slices < 1:
        raise TopologyError(f"--num_slices {num_slices}: give 1 or more slices")
    return Slice(name, chip, shapes[chips], num_slices)


def _tpu_env() -> None:
    # A compile-only TPU client on a host without TPUs: no metadata server, several processes
    # (test workers) may load libtpu at once.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def devices(s: Slice) -> list:
    """Compile-only devices of the slice (one per chip; megacore chips are one device)."""
    _tpu_env()
    from jax.experimental import topologies

    wrap = tuple(s.chip.torus and n >= 4 for n in s.shape)
    bounds = (2, 2, 1) if s.chips // s.num_slices >= 4 else (1, 1, 1)
    try:
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{s.chip.platform_name}:{'x'.join(map(str, s.shape))}",
            chip_config_name=s.chip.chip_config,
            chips_per_host_bounds=bounds,
            num_slices=s.num_slices,
            wrap=wrap + (False,) * (3 - len(wrap)),
        )
    except Exception as e:  # no libtpu, or a libtpu that does not know the chip
        raise TopologyError(
            f"cannot make compile-only {s.name} devices ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu: "
            "pip install -r requirements-tpu.txt"
        ) from e
    return list(topo.devices)
