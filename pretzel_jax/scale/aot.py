"""Compile an experiment's real train step for a TPU slice that is not here, and say whether it
fits, what it costs and how it would run.

    python -m pretzel_jax.scale.aot --config experiments/starflow2_7b.py:stage3 --topology v5p-128
        [--num_slices 2] [--save step.bin] [--json out.json] [--config.train.microbatches=4 ...]

The step is the trainer's own (`train.state.build_setup` + `train.step.make_train_step`) over the
same abstract sharded state, built on compile-only devices of the slice (`scale.topology`); no
array is allocated and no weight file is read. The table:

- per-device bytes of the trainable parameters, their optimizer state and the frozen weights
  (from each leaf's sharding), and XLA's memory analysis: arguments, temporaries (activations
  and the rest), peak = arguments + outputs - aliased + temporaries, against the chip's HBM;
- FLOPs per step: counted from the step's jaxpr (`scale.flops`: scan bodies times their length,
  remat recomputation included; "model" = the same step with remat off) and XLA's compiled
  figure (which counts a scan body once, so it is low for scanned layers);
- collective bytes per device from the compiled HLO (while-loop bodies times their trip
  counts);
- a roofline estimate: the step takes at least max(hardware FLOPs / peak, collective bytes /
  ICI bandwidth) per device; MFU = model FLOPs / (chips * peak * that time) is an upper bound.

A program that does not fit fails with one line naming XLA's HBM figures and the knobs to turn.
Needs libtpu (`pip install -r requirements-tpu.txt`); runs on any host (JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host itself computes nothing

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from pretzel_jax.scale import flops, topology  # noqa: E402
from pretzel_jax.train.errors import ConfigError  # noqa: E402

GIB = 1 << 30
# config paths of every remat knob and every layer-scan unroll knob a model may have
_REMAT = ("model.flow.remat", "model.vlm.text.remat", "model.vlm.vision.remat", "model.fae.remat")
_UNROLL = (
    "model.flow.unroll_layers",
    "model.vlm.text.unroll_layers",
    "model.vlm.vision.unroll_layers",
    "model.fae.encoder.random.unroll_layers",
)


class AotError(RuntimeError):
    """The step does not compile or does not fit; the message is one line with the fix."""


@dataclasses.dataclass
class Report:
    experiment: str
    topology: str
    num_slices: int
    devices: int
    mesh: dict[str, int]
    microbatches: int
    params_bytes: int  # per device
    opt_state_bytes: int
    frozen_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    hbm_bytes: int
    flops: float  # per step, all devices, counted (remat included)
    model_flops: float  # the same without remat recomputation
    compiled_flops: float  # XLA's, all devices (scan bodies once)
    while_loops: int  # bodies the count took once (then a floor)
    collective_bytes: dict[str, int]  # per device, by kind
    step_seconds: float  # roofline lower bound
    mfu: float  # upper bound
    compile_seconds: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    def table(self) -> str:
        g = lambda b: f"{b / GIB:,.2f} GiB" if b >= GIB / 10 else f"{b / (1 << 20):,.2f} MiB"  # noqa: E731
        t = lambda f: f"{f / 1e12:,.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:,.2f} GFLOP"  # noqa: E731
        mesh = " x ".join(f"{a}={n}" for a, n in self.mesh.items())
        coll = ", ".join(f"{k} {g(v)}" for k, v in self.collective_bytes.items()) or "none"
        floor = f" (floor: {self.while_loops} while-loop bodies counted once)"
        rows = [
            ("experiment", self.experiment),
            ("slice", f"{self.topology} x {self.num_slices} = {self.devices} chips, {mesh}"),
            ("microbatches", str(self.microbatches)),
            ("trainable params / device", g(self.params_bytes)),
            ("optimizer state / device", g(self.opt_state_bytes)),
            ("frozen weights / device", g(self.frozen_bytes)),
            ("arguments / device", g(self.argument_bytes)),
            ("temporaries / device", g(self.temp_bytes)),
            (
                "peak / device",
                f"{g(self.peak_bytes)} of {g(self.hbm_bytes)} HBM"
                f" ({100 * self.peak_bytes / self.hbm_bytes:.0f}%)",
            ),
            ("fits", "yes" if self.fits else "NO"),
            ("FLOPs / step, counted", t(self.flops) + (floor if self.while_loops else "")),
            ("FLOPs / step, model (no remat)", t(self.model_flops)),
            ("FLOPs / step, XLA compiled", t(self.compiled_flops) + " (scan bodies once)"),
            ("collectives / device / step", coll),
            ("step time, roofline", f"{self.step_seconds:.3f} s"),
            ("MFU at peak, upper bound", f"{100 * self.mfu:.1f}%"),
            ("compile time", f"{self.compile_seconds:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _set(config: ConfigDict, path: str, value) -> None:
    """config[path] = value where the config has that knob (models differ in what they have)."""
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        if p not in node or node[p] is None:
            return
        node = node[p]
    if leaf in node:
        node[leaf] = value


def variant(config: ConfigDict, *, remat: str | None = None, unroll: bool = False) -> ConfigDict:
    """A copy of `config` with every remat policy set to `remat` and/or every layer scan
    unrolled (and cross-entropy in one chunk), so XLA's compiled count sees every layer."""
    config = config.copy_and_resolve_references()
    config.unlock()
    for path in _REMAT if remat is not None else ():
        _set(config, path, remat)
    if unroll:
        for path in _UNROLL:
            _set(config, path, True)
        _set(config, "model.pretzel.ce_chunk", 1 << 30)
    return config


def abstract_batch(config: ConfigDict, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as the trainer places it (`train.step.shard_batch`), abstractly."""
    from pretzel_jax.data import batch_shapes
    from pretzel_jax.train.step import batch_sharding

    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(shape, mesh, rules))
        for name, (shape, dtype) in batch_shapes(config.data).items()
    }


def _device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def _step(config: ConfigDict, devices: list):
    """(setup, jitted train step, its abstract arguments) on `devices`."""
    from pretzel_jax import models
    from pretzel_jax.train.mesh import make_mesh
    from pretzel_jax.train.state import build_setup
    from pretzel_jax.train.step import make_train_step

    setup = build_setup(config, make_mesh(config.mesh, devices), models.build)
    args = (setup.abstract, abstract_batch(config, setup.mesh, setup.rules), setup.rest_abstract)
    return setup, make_train_step(setup), args


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8)
_BYTES.update(u64=8, f64=8)


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each collective kind outputs per device in one run of the module: per computation,
    its collectives plus its callees' (while bodies times their trip counts)."""
    comps: dict[str, list[str]] = {}
    name, entry = None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(2)
            entry = name if head.group(1) else entry
            comps[name] = []
        elif name is not None:
            comps[name].append(line)

    memo: dict[str, dict[str, int]] = {}

    def total(comp: str) -> dict[str, int]:
        if comp in memo:
            return memo[comp]
        memo[comp] = out = {}
        for line in comps.get(comp, ()):
            line = re.sub(r"/\*.*?\*/", "", line)  # tuple shapes carry /*index=5*/ comments
            m = _COLLECTIVE.search(line)
            if m:
                size = sum(
                    _BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                    for t, dims in _ARRAY.findall(m.group(1))
                )
                out[m.group(2)] = out.get(m.group(2), 0) + size
            trips = _trip_count(line, comps) if " while(" in line else 1
            for callee in re.findall(
                r"(?:body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", line
            ):
                for k, v in total(callee).items():
                    out[k] = out.get(k, 0) + trips * v
        return out

    return dict(sorted(total(entry).items())) if entry else {}


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's `known_trip_count`, else the one integer constant its
    condition compares the counter with (how a scan lowers), else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    consts = {
        int(c)
        for body_line in comps.get(cond.group(1) if cond else "", ())
        for c in re.findall(r"s32\[\][^=]*constant\((\d+)\)", body_line)
    }
    return consts.pop() if len(consts) == 1 else 1


def compile_step(
    config: ConfigDict,
    experiment: str,
    slice_: topology.Slice,
    *,
    save: str | None = None,
) -> Report:
    """Compile `config`'s train step for `slice_` and measure it (raises AotError when it does
    not compile or fit)."""
    devices = topology.devices(slice_)
    setup, step, args = _step(config, devices)
    counted = flops.count(step, *args)
    _, model_step, model_args = _step(variant(config, remat="none"), devices)
    model = flops.count(model_step, *model_args)
    start = time.perf_counter()
    try:
        compiled = step.lower(*args).compile()
    except Exception as e:  # XlaRuntimeError; its text names the HBM figures
        text = str(e)
        over = re.search(r"RESOURCE_EXHAUSTED[^\n]*", text)
        if over:
            raise AotError(
                f"{experiment} does not fit {slice_.name} x {slice_.num_slices}: "
                f"{over.group(0)[:400].rstrip('. ')}; try a larger slice (--topology), more "
                "--config.train.microbatches, remat 'full', or a wider fsdp mesh axis"
            ) from e
        raise AotError(f"{experiment} does not compile for {slice_.name}: {text[:400]}") from e
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    n = len(devices)
    coll = collective_bytes(compiled.as_text())
    chip = slice_.chip
    step_s = max(
        counted.total / n / chip.peak_flops, sum(coll.values()) / chip.ici_bandwidth, 1e-12
    )
    if save:
        from jax.experimental import serialize_executable

        payload, _, _ = serialize_executable.serialize(compiled)
        with open(save, "wb") as f:
            f.write(payload)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return Report(
        experiment=experiment,
        topology=slice_.name,
        num_slices=slice_.num_slices,
        devices=n,
        mesh=dict(setup.mesh.shape),
        microbatches=int(config.train.microbatches),
        params_bytes=_device_bytes(setup.abstract.params),
        opt_state_bytes=_device_bytes(setup.abstract.opt_state),
        frozen_bytes=_device_bytes(setup.rest_abstract.frozen),
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        peak_bytes=peak + mem.temp_size_in_bytes,
        hbm_bytes=chip.hbm_bytes,
        flops=counted.total,
        model_flops=model.total,
        compiled_flops=float(cost.get("flops", 0.0)) * n,
        while_loops=counted.while_loops,
        collective_bytes=coll,
        step_seconds=step_s,
        mfu=model.total / (n * chip.peak_flops * step_s),
        compile_seconds=seconds,
    )


def markdown(rows: list[tuple[str, int, Report | str]]) -> str:
    """One line per compiled slice: fit, memory, FLOPs, collectives, roofline time and MFU."""
    head = (
        "| slice | chips | microbatches | peak / chip (HBM) | fits | FLOPs / step (model) "
        "| collectives / chip | step, roofline | MFU, upper bound |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name, k, r in rows:
        if isinstance(r, str):
            lines.append(f"| {name} | | {k} | {r} | no | | | | |")
            continue
        coll = sum(r.collective_bytes.values()) / GIB
        lines.append(
            f"| {name} x {r.num_slices} | {r.devices} | {k} | {r.peak_bytes / GIB:.1f} GiB "
            f"({r.hbm_bytes / GIB:.2f}) | {'yes' if r.fits else 'no'} | {r.flops / 1e15:.2f} P "
            f"({r.model_flops / 1e15:.2f} P) | {coll:.2f} GiB | {r.step_seconds:.2f} s "
            f"| {100 * r.mfu:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pretzel_jax.train.config import load_config

    parser = argparse.ArgumentParser(prog="python -m pretzel_jax.scale.aot", description=__doc__)
    parser.add_argument("--config", required=True, help="EXPERIMENT.py[:arg]")
    parser.add_argument(
        "--topology",
        required=True,
        nargs="+",
        help="TPU slices, each NAME[:MICROBATCHES] (v5p-128, v6e-8:8); one table row each",
    )
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN")
    parser.add_argument("--save", help="write the serialised compiled step here (one slice)")
    parser.add_argument("--json", help="write the reports as JSON here")
    parser.add_argument("--markdown", help="write the one-line-per-slice table here")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; config overrides look like --config.train.steps=1")
    if args.save and len(args.topology) > 1:
        parser.error("--save takes one --topology")
    rows, reports, failed = [], [], False
    for item in args.topology:
        name, _, k = item.partition(":")
        try:
            slice_ = topology.parse(name, args.num_slices)
            extra = [f"train.microbatches={int(k)}"] if k else []
            config = load_config(
                args.config,
                overrides=[o.removeprefix("--config.") for o in overrides] + extra,
                device_count=slice_.chips,
                process_count=1,
            )
            report = compile_step(config, args.config, slice_, save=args.save)
        except AotError as e:
            print(f"error: {e}", file=sys.stderr)
            need = re.search(r"\(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", str(e))
            rows.append((name, int(k or 1), f"needs {need[1]} ({need[2]})" if need else str(e)))
            failed = True
            continue
        except (topology.TopologyError, ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(report.table(), flush=True)
        rows.append((name, report.microbatches, report))
        reports.append(dataclasses.asdict(report) | {"fits": report.fits})
        failed |= not report.fits
    if len(rows) > 1 or args.markdown:
        table = markdown(rows)
        print(table)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
