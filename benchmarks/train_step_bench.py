"""Train-step time of an experiment config against variants of it, same machine, same run.

    python benchmarks/train_step_bench.py --config experiments/shapes_stage0_vlm.py \\
        --variant scanned:model.vlm.text.unroll_layers=False,model.vlm.vision.unroll_layers=False \\
        [--steps 20] [--repeats 3]

Every variant (the config as it is, then each `--variant name:key=value,...`, overrides as
`load_config` takes them) gets its own state, jitted step and the same `--steps` batches from the
config's training data; after one compiling step per variant, the variants alternate step by step,
so that machine load hits all of them alike. Prints a Markdown table of median step times and their
ratio to the config's (< 1: the variant is faster). Overrides must keep the batch shapes (they share
batches). Not used by the tests: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from pretzel_jax import models
from pretzel_jax.data import make_iterator, make_stage_iterator
from pretzel_jax.train.config import load_config
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.state import build_setup, init_rest, init_state
from pretzel_jax.train.step import make_train_step, shard_batch


def parse_variant(text: str) -> tuple[str, list[str]]:
    """ "name:key=value,..." -> (name, ["key=value", ...]) (`load_config` overrides)."""
    name, _, assignments = text.partition(":")
    return name, [item for item in assignments.split(",") if item]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    variants = [("config", [])] + [parse_variant(v) for v in args.variant]
    base = load_config(args.config)
    make = make_stage_iterator if "stage" in base.data else make_iterator
    data = make(base.data, base.data.train_split, process_index=0, process_count=1)
    host_batches = [next(data) for _ in range(args.steps + 1)]
    runs = []
    for name, overrides in variants:
        cfg = load_config(args.config, overrides=overrides)
        setup = build_setup(cfg, make_mesh(base.mesh), models.build)
        batches = [shard_batch(b, setup.mesh, setup.rules) for b in host_batches]
        step, rest = make_train_step(setup), init_rest(setup)
        state, metrics = step(init_state(setup), batches[0], rest)  # compiles
        jax.block_until_ready(metrics)
        runs.append({"name": name, "step": step, "rest": rest, "state": state, "batches": batches})
    times = {r["name"]: [] for r in runs}
    for _ in range(args.repeats):
        for i in range(1, args.steps + 1):
            for r in runs:
                start = time.perf_counter()
                r["state"], metrics = r["step"](r["state"], r["batches"][i], r["rest"])
                jax.block_until_ready(metrics)
                times[r["name"]].append(time.perf_counter() - start)
    ref = statistics.median(times["config"])
    print(f"{args.config}, {args.steps} steps x {args.repeats}, {jax.devices()[0].platform}")
    print("| variant | median step (s) | ratio to config |\n|---|---|---|")
    for name, overrides in variants:
        med = statistics.median(times[name])
        label = f"{name} ({', '.join(overrides)})"
        print(f"| {label if overrides else name} | {med:.3f} | {med / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
