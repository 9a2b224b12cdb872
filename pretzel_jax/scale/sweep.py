"""Scaling-law sweeps of the Pretzel flow stream: plan, launch, collect, fit, plot.

    python -m pretzel_jax.scale.sweep --config experiments/shapes_stage1.py \\
        --family "width=16*k,head_dim=16" --sizes 3,4,5,6,7,8 --budget 2e13 \\
        --out runs/sweep_stage1 [--plan] [--collect] [--config.KEY=VALUE ...]

A **family** is a rule `key=expr,...` that turns a size index k into the flow's shape; each
`expr` is an integer expression in k (`64*k`, `k+2`, `4`). Keys:
  width           model.flow.width (the deep and shallow blocks' width)
  depth           layers of the deep block (model.flow.layers_per_block[-1])
  heads           attention heads (head_dim = width / heads); or
  head_dim        the head size (heads = width / head_dim); `rope_sections` are rescaled to it
  kv_heads        grouped-query KV heads (model.flow.kv_heads)
  shallow_depth   layers of each shallow block
  shallow_blocks  number of shallow blocks
Keys the rule leaves out keep the base experiment's value.

**Parameters** N: the trainable parameters of the built model (`nnx.eval_shape` of
`pretzel_jax.models.build`, so no arrays; trainable = not matched by `optim.freeze`).

**Compute convention.** C = steps * F, where F is an analytic count of the training FLOPs per
step of the trainable flow stream at the configured shapes: 3 x the forward FLOPs (backward = 2 x
forward) of the deep block over the whole packed sequence (`batch_size` rows of `seq_len`
positions: attention projections, MLP, the full T x T score and value products as the masked
kernel computes them, its input/context/output projections) plus the shallow blocks over every
image slot (`batch_size * max_images` images of L latent tokens). One multiply-add = 2 FLOPs. The
frozen VLM and FAE forward passes and the eval steps are not counted (the first is the same for
every size of the family). The plan and the table also give the Kaplan 6*N*D with D = image
latent tokens trained (slots included), for comparison.

**Budgets.** `--allocation ratio` (default): each budget in `--budget` is the *total* compute of
one sweep, split so every size trains the same number of image tokens per trainable parameter
(steps proportional to N, a "scaling ladder"); then L(C) = a * C^-b is fitted over the runs'
final losses. `--allocation iso`: every size trains for the full compute of each budget (IsoFLOP
profiles); the best size of each budget (parabola in log N) gives N_opt(C) and L_opt(C), fitted
as power laws when two or more budgets are given. `--irreducible` fits L(C) = e + a * C^-b.

Each run is `python -m pretzel_jax.train --config BASE --run_dir OUT/NAME --config.X=...` with
the family's overrides, `train.steps`, a warm-up of `--warmup_frac` of the steps, one eval at the
last step (`train.eval_every = steps`, the loss that is fitted: `--metric`, default
`eval/bits_per_dim`), a checkpoint only at the end, and any `--config.X=Y` given to the sweep
(e.g. cheaper end-of-run report knobs). `--plan` (or `--dry_run`) writes OUT/plan.json and
OUT/plan.sh (one command per line, for a cluster launcher) and runs nothing; without it the runs
are launched here one after another (a run that already reached its final eval is skipped, so a
stopped sweep resumes), then collected. `--collect` only collects. Outputs: OUT/results.json,
OUT/table.md, OUT/sweep.png (and `--png PATH`, a copy).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import math
import operator
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pretzel_jax.scale.powerlaw import FitError, fit_power_law, isoflop_minimum, plot_sweep

__all__ = [
    "Family",
    "SweepError",
    "collect",
    "final_metric",
    "flow_train_flops",
    "main",
    "plan_sweep",
    "trainable_params",
]

ALLOCATIONS = ("ratio", "iso")
FAMILY_KEYS = {
    "width": "model.flow.width",
    "depth": "layers of the deep block",
    "heads": "attention heads (head_dim = width / heads)",
    "head_dim": "model.flow.head_dim",
    "kv_heads": "model.flow.kv_heads",
    "shallow_depth": "layers of each shallow block",
    "shallow_blocks": "number of shallow blocks",
}
# Keys the sweep sets per run: a --config override of these would change the plan's meaning.
_SWEEP_KEYS = ("train.steps", "train.eval_every", "model.flow.width", "model.flow.head_dim")
PLAN = "plan.json"
RUNS_LOG = "runs.jsonl"


class SweepError(ValueError):
    """A bad sweep input; the message names it and the fix."""


# -- the family rule --------------------------------------------------------------------------

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


def _eval_int(expr: str, k: int, where: str) -> int:
    """An integer expression in k: ints, k, + - * // ** and parentheses."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id == "k":
            return k
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise SweepError(
            f"family {where}={expr!r}: use an integer expression in k (ints, k, + - * // **)"
        )

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise SweepError(f"family {where}={expr!r} is not an expression in k") from None
    return ev(tree)


def _tuple(values) -> str:
    """A tuple literal without spaces (one shell word): (2,2,4), (4,)."""
    values = [str(v) for v in values]
    return "(" + ",".join(values) + ("," if len(values) == 1 else "") + ")"


@dataclasses.dataclass(frozen=True)
class Family:
    """`key -> integer expression in k` (FAMILY_KEYS), e.g. Family.parse("width=64*k,depth=4")."""

    rule: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Family:
        rule = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, expr = item.partition("=")
            key = key.strip()
            if not sep or not expr.strip():
                raise SweepError(f"family item {item!r} is not key=expr (e.g. width=64*k)")
            if key not in FAMILY_KEYS:
                raise SweepError(
                    f"unknown family key {key!r}; use {', '.join(FAMILY_KEYS)} (e.g. width=64*k)"
                )
            if key in rule:
                raise SweepError(f"family key {key!r} is given twice")
            rule[key] = expr.strip()
        if not rule:
            raise SweepError("the family rule is empty; give e.g. --family 'width=64*k'")
        if "heads" in rule and "head_dim" in rule:
            raise SweepError("family: give heads or head_dim, not both (head_dim = width / heads)")
        return cls(rule)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.rule.items())

    def shape(self, k: int, flow) -> dict[str, int | None]:
        """The flow shape of size k; `flow`: the base config's model.flow section."""
        v = {key: _eval_int(expr, k, key) for key, expr in self.rule.items()}
        layers = tuple(flow.layers_per_block)
        shallow = layers[:-1]
        shape = {
            "width": v.get("width", flow.width),
            "depth": v.get("depth", layers[-1]),
            "shallow_blocks": v.get("shallow_blocks", len(shallow)),
            "shallow_depth": v.get("shallow_depth", shallow[0] if shallow else 1),
            "kv_heads": v.get("kv_heads", flow.kv_heads),
        }
        width = shape["width"]
        if "heads" in v:
            if v["heads"] <= 0 or width % v["heads"]:
                raise SweepError(
                    f"family at k={k}: width {width} is not a multiple of heads {v['heads']}"
                )
            shape["head_dim"] = width // v["heads"]
        else:
            shape["head_dim"] = v.get("head_dim", flow.head_dim)
        for key in ("width", "depth", "head_dim", "shallow_depth"):
            if shape[key] <= 0:
                raise SweepError(f"family at k={k}: {key}={shape[key]} must be positive")
        if shape["shallow_blocks"] < 0:
            raise SweepError(f"family at k={k}: shallow_blocks must be >= 0")
        if width % shape["head_dim"]:
            raise SweepError(
                f"family at k={k}: width {width} is not a multiple of head_dim "
                f"{shape['head_dim']}; change the rule so every size divides"
            )
        shape["heads"] = width // shape["head_dim"]
        return shape

    def overrides(self, k: int, flow) -> list[str]:
        """The `key=value` config overrides of size k."""
        s = self.shape(k, flow)
        layers = (s["shallow_depth"],) * s["shallow_blocks"] + (s["depth"],)
        out = [
            f"model.flow.width={s['width']}",
            f"model.flow.head_dim={s['head_dim']}",
            f"model.flow.layers_per_block={_tuple(layers)}",
        ]
        if "kv_heads" in self.rule:
            out.append(f"model.flow.kv_heads={s['kv_heads']}")
        if flow.rope == "sectioned" and s["head_dim"] != flow.head_dim:
            base = tuple(flow.rope_sections)
            half = s["head_dim"] // 2
            scaled = [x * half / sum(base) for x in base]
            if any(x != int(x) for x in scaled):
                raise SweepError(
                    f"family at k={k}: head_dim {s['head_dim']} cannot keep the base "
                    f"rope_sections {base} ratio; use a head_dim whose half is a multiple of "
                    f"{sum(base) // math.gcd(*base)}"
                )
            out.append(f"model.flow.rope_sections={_tuple(int(x) for x in scaled)}")
        return out


# -- parameters and FLOPs ---------------------------------------------------------------------


def trainable_params(config) -> tuple[int, int]:
    """(trainable, total) parameter counts of the model `config` builds, from `nnx.eval_shape`
    (no arrays are allocated); trainable = not frozen by `optim.freeze`."""
    import numpy as np
    from flax import nnx
    from flax.traverse_util import flatten_dict

    from pretzel_jax import models
    from pretzel_jax.train.optimizer import param_policy, path_str

    abstract = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param).to_pure_dict()
    policy = param_policy(params, config.optim)
    sizes = {path_str(k): int(np.prod(v.shape)) for k, v in flatten_dict(params).items()}
    return sum(n for p, n in sizes.items() if p in policy.trainable), sum(sizes.values())


def _layer_forward_flops(t: int, f) -> int:
    """Forward FLOPs of one Transformer layer of FlowConfig `f` over a sequence of t tokens."""
    w, hd = f.width, f.head_dim
    heads = w // hd
    kv = f.kv_heads or heads
    mlp = int(w * f.mlp_ratio) * (3 if f.mlp_kind == "swiglu" else 2)
    proj = 2 * t * w * (heads * hd + 2 * kv * hd) + 2 * t * heads * hd * w
    attn = 2 * 2 * t * t * heads * hd  # q k^T and p v over the whole t x t (masked, not skipped)
    return proj + attn + 2 * t * w * mlp


def flow_train_flops(config) -> dict[str, int]:
    """Training FLOPs per step of the Pretzel flow stream (module docstring: the convention).
    -> flops (3 x forward), forward, image_tokens (latent slots per step), positions (deep)."""
    if config.model.kind != "pretzel":
        raise SweepError(
            f"FLOPs are counted for model.kind='pretzel' (the flow stream); got "
            f"{config.model.kind!r}"
        )
    from pretzel_jax.models.pretzel import pretzel_config

    pc = pretzel_config(config)
    f, d = pc.flow, config.data
    rows, t = d.batch_size, d.seq_len
    big_l = pc.latents_per_image
    images = d.max_images or t // (big_l + 2)  # the layout's slots per row
    dim, w = f.token_dim, f.width
    deep = f.layers_per_block[-1] * _layer_forward_flops(t, f)
    deep += 2 * t * (dim * w + f.context_dim * w + w * 2 * dim)  # proj_in, proj_ctx, proj_out
    shallow = sum(n * _layer_forward_flops(big_l, f) for n in f.layers_per_block[:-1])
    shallow += (len(f.layers_per_block) - 1) * 2 * big_l * (dim * w + w * 2 * dim)
    forward = rows * deep + rows * images * shallow
    return {
        "flops": 3 * forward,
        "forward": forward,
        "image_tokens": rows * images * big_l,
        "positions": rows * t,
    }


# -- the plan ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    name: str
    k: int
    budget: float
    shape: dict
    params: int
    params_total: int
    flops_per_step: int
    image_tokens_per_step: int
    steps: int
    overrides: list[str]
    command: list[str]

    @property
    def compute(self) -> float:
        return float(self.flops_per_step) * self.steps

    @property
    def six_nd(self) -> float:
        return 6.0 * self.params * self.image_tokens_per_step * self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"compute": self.compute, "six_nd": self.six_nd}


def _budget_name(b: float) -> str:
    return f"{b:.3g}".replace("+", "")


def _schedule(steps: int, base, warmup_frac: float) -> list[str]:
    warmup = min(max(1, round(warmup_frac * steps)), steps - 1)
    log_every = min(base.train.log_every, max(1, steps // 10))
    return [
        f"train.steps={steps}",
        f"optim.warmup_steps={warmup}",
        f"train.eval_every={steps}",
        f"train.log_every={log_every}",
        "train.ckpt_every=0",
        "train.progress_bar=off",
    ]


@functools.lru_cache(maxsize=64)
def _size_stats(config_path: str, overrides: tuple[str, ...]) -> tuple[int, int, dict]:
    """(trainable, total params, flow_train_flops) of the base experiment with `overrides`."""
    from pretzel_jax.train.config import load_config

    cfg = load_config(config_path, overrides=overrides)
    return (*trainable_params(cfg), flow_train_flops(cfg))


def plan_sweep(
    config_path: str,
    family: Family,
    sizes: Sequence[int],
    budgets: Sequence[float],
    *,
    out: str | Path,
    allocation: str = "ratio",
    extra: Sequence[str] = (),
    min_steps: int = 20,
    max_steps: int = 0,
    warmup_frac: float = 0.1,
    python: str = "python",
    log=print,
) -> list[Run]:
    """The runs of a sweep (module docstring: allocation, compute). Each size's config is
    loaded and validated (bad family shapes fail here), then counted."""
    from pretzel_jax.train.config import load_config

    if allocation not in ALLOCATIONS:
        raise SweepError(f"--allocation {allocation!r} is unknown; use one of {ALLOCATIONS}")
    if not sizes or len(set(sizes)) != len(sizes):
        raise SweepError(f"--sizes must be distinct values of k, got {list(sizes)}")
    if not budgets or any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise SweepError(f"--budget must be positive FLOP counts, got {list(budgets)}")
    for o in extra:
        key = o.partition("=")[0].strip()
        if key in _SWEEP_KEYS or key.startswith("model.flow.layers_per_block"):
            raise SweepError(f"--config.{key} is set by the sweep per run; leave it out")
    base = load_config(config_path, overrides=extra)
    sized = []
    for k in sorted(sizes):
        fam = family.overrides(k, base.model.flow)
        try:
            n, total, fl = _size_stats(str(config_path), (*fam, *extra))
        except SweepError:
            raise
        except ValueError as e:  # ConfigError and the model dataclasses' checks
            raise SweepError(f"size k={k} ({', '.join(fam)}): {' '.join(str(e).split())}") from e
        sized.append((k, fam, family.shape(k, base.model.flow), n, total, fl))

    runs: list[Run] = []
    for budget in budgets:
        if allocation == "ratio":
            # steps_i = r * N_i with sum_i F_i * steps_i = budget.
            r = budget / sum(fl["flops"] * n for _, _, _, n, _, fl in sized)
            steps = [r * n for _, _, _, n, _, fl in sized]
        else:
            steps = [budget / fl["flops"] for *_, fl in sized]
        small = min(range(len(sized)), key=lambda i: sized[i][3])
        if steps[small] < min_steps:
            k, _, _, n, _, _ = sized[small]
            need = budget * min_steps / steps[small]
            raise SweepError(
                f"budget {budget:.3g} FLOPs is too small for the smallest model (k={k}, "
                f"N={n:,}): it would train {steps[small]:.1f} steps < --min_steps {min_steps}; "
                f"raise --budget to at least {need:.3g}"
            )
        for (k, fam, shape, n, total, fl), s in zip(sized, steps, strict=True):
            s = round(s)
            if s < min_steps or (max_steps and s > max_steps):
                log(
                    f"skip k={k} at budget {budget:.3g}: {s} steps is outside "
                    f"[--min_steps {min_steps}, --max_steps {max_steps or 'none'}]"
                )
                continue
            name = f"C{_budget_name(budget)}_k{k}" if len(budgets) > 1 else f"k{k}"
            overrides = [*fam, *extra, *_schedule(s, base, warmup_frac)]
            run_dir = Path(out) / name
            command = [
                python,
                "-m",
                "pretzel_jax.train",
                "--config",
                str(config_path),
                "--run_dir",
                str(run_dir),
                *(f"--config.{o}" for o in overrides),
            ]
            runs.append(
                Run(
                    name,
                    k,
                    budget,
                    shape,
                    n,
                    total,
                    fl["flops"],
                    fl["image_tokens"],
                    s,
                    overrides,
                    command,
                )
            )
    if not runs:
        raise SweepError("no run is left in the plan; widen --min_steps/--max_steps or --budget")
    return runs


def write_plan(runs: Sequence[Run], out: Path, meta: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    plan = out / PLAN
    plan.write_text(json.dumps({**meta, "runs": [r.to_dict() for r in runs]}, indent=2) + "\n")
    sh = out / "plan.sh"
    lines = ["#!/bin/sh", "# One training run per line (python -m pretzel_jax.scale.sweep --plan)"]
    lines += [shlex.join(r.command) for r in runs]
    sh.write_text("\n".join(lines) + "\n")
    return plan, sh


def load_plan(out: Path) -> dict:
    path = out / PLAN
    if not path.is_file():
        raise SweepError(f"{path} does not exist; plan the sweep first (same command with --plan)")
    return json.loads(path.read_text())


# -- running and collecting -------------------------------------------------------------------


def final_metric(run_dir: str | Path, metric: str = "eval/bits_per_dim") -> tuple[int, float]:
    """(step, value) of the last logged `metric` in run_dir/metrics.jsonl (the newest step; a
    later row of the same step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SweepError(
            f"{run_dir} has no metrics.jsonl: the run did not start or failed (see its "
            "train.log); rerun the sweep without --collect to (re)launch it"
        )
    best, keys = None, set()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        keys.update(row)
        value = row.get(metric)
        if value is not None and (best is None or row["step"] >= best[0]):
            best = (int(row["step"]), float(value))
    if best is None:
        known = sorted(k for k in keys if k.startswith("eval/")) or sorted(keys - {"step"})
        raise SweepError(
            f"{path} has no {metric!r} row (logged: {', '.join(known) or 'nothing'}); the run "
            "ended before its final eval, or pick another --metric"
        )
    return best


def _curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of the train rows of `key` (the unprefixed name of the metric)."""
    out = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get(key) is not None:
            out.append((int(row["step"]), float(row[key])))
    return out


def _step_time(run_dir: Path) -> float | None:
    """Median train step time (s) over the log windows after the first (which compiles)."""
    times = [t for _, t in _curve(run_dir, "step_time_s")][1:]
    return float(sorted(times)[len(times) // 2]) if times else None


def _done(run: dict, out: Path, metric: str) -> bool:
    try:
        step, _ = final_metric(out / run["name"], metric)
    except SweepError:
        return False
    return step >= run["steps"]


def launch(plan: dict, out: Path, metric: str, log=print) -> None:
    """Run the plan's commands here one after another (finished runs are skipped); each run's
    output goes to its train.log, its wall time and load averages to OUT/runs.jsonl."""
    for i, run in enumerate(plan["runs"]):
        run_dir = out / run["name"]
        if _done(run, out, metric):
            log(f"[{i + 1}/{len(plan['runs'])}] {run['name']}: done before, skipped")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, *run["command"][1:]]
        load0 = os.getloadavg()
        log(
            f"[{i + 1}/{len(plan['runs'])}] {run['name']}: {run['steps']} steps, "
            f"N={run['params']:,} (load {load0[0]:.2f})"
        )
        start = time.time()
        with open(run_dir / "train.log", "ab") as f:
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        wall = time.time() - start
        record = {
            "name": run["name"],
            "rc": rc,
            "wall_s": wall,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            "load_before": list(load0),
            "load_after": list(os.getloadavg()),
        }
        with open(out / RUNS_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"    rc={rc}, {wall:.0f} s")
        if rc != 0:
            raise SweepError(
                f"run {run['name']} failed (exit {rc}); see {run_dir / 'train.log'}, fix it and "
                "rerun the same sweep command (finished runs are skipped)"
            )


def _wall_records(out: Path) -> dict[str, dict]:
    path = out / RUNS_LOG
    records: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else ():
        r = json.loads(line)
        if r["rc"] == 0:
            records[r["name"]] = r
    return records


def collect(plan: dict, out: Path, metric: str, *, irreducible: bool = False) -> dict:
    """Final losses of every planned run, the fits and the figure's data -> results dict."""
    walls = _wall_records(out)
    train_key = metric.split("/", 1)[1] if metric.startswith("eval/") else metric
    rows = []
    for run in plan["runs"]:
        step, value = final_metric(out / run["name"], metric)
        if step < run["steps"]:
            raise SweepError(
                f"{out / run['name']}: the last {metric!r} is at step {step} of {run['steps']}; "
                "rerun the sweep without --collect to finish it"
            )
        wall = walls.get(run["name"], {})
        curve = [
            (s * run["flops_per_step"], v) for s, v in _curve(out / run["name"], train_key) if s > 0
        ]
        rows.append(
            run
            | {
                "loss": value,
                "wall_s": wall.get("wall_s"),
                "step_s": _step_time(out / run["name"]),
                "load_before": wall.get("load_before"),
                "load_after": wall.get("load_after"),
                "curve": curve,
            }
        )
    result = {"metric": metric, "allocation": plan["allocation"], "runs": rows}
    budgets = sorted({r["budget"] for r in rows})
    try:
        if plan["allocation"] == "ratio":
            law = fit_power_law(
                [r["compute"] for r in rows], [r["loss"] for r in rows], irreducible=irreducible
            )
            result["law"] = law.to_dict() | {"formula": law.formula()}
        else:
            optima = []
            for b in budgets:
                mine = [r for r in rows if r["budget"] == b]
                n_opt, l_opt = isoflop_minimum(
                    [r["params"] for r in mine], [r["loss"] for r in mine]
                )
                optima.append((b, n_opt, l_opt))
            result["optima"] = optima
            if len(optima) >= 2:
                law = fit_power_law(
                    [o[0] for o in optima],
                    [o[2] for o in optima],
                    irreducible=irreducible and len(optima) >= 3,
                )
                n_law = fit_power_law([o[0] for o in optima], [o[1] for o in optima])
                result["law"] = law.to_dict() | {"formula": law.formula()}
                result["n_opt_law"] = n_law.to_dict() | {"formula": n_law.formula("N_opt")}
    except FitError as e:
        result["fit_error"] = str(e)
    return result


def table(result: dict) -> str:
    """The sweep as a markdown table, then the fitted laws."""
    m = result["metric"]
    head = [
        "run",
        "k",
        "width",
        "depth",
        "heads",
        "trainable N",
        "FLOPs/step",
        "steps",
        "C (FLOPs)",
        "6ND",
        f"final {m}",
        "s/step",
        "wall s",
        "load 1 min",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        s = r["shape"]
        load = r.get("load_before") or []
        after = r.get("load_after") or []
        loads = f"{load[0]:.1f} -> {after[0]:.1f}" if load and after else ""
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else ""
        cells = [
            r["name"],
            r["k"],
            s["width"],
            s["depth"],
            s["heads"],
            f"{r['params']:,}",
            f"{r['flops_per_step']:.3g}",
            r["steps"],
            f"{r['compute']:.3g}",
            f"{r['six_nd']:.3g}",
            f"{r['loss']:.4f}",
            f"{r['step_s']:.2f}" if r.get("step_s") is not None else "",
            wall,
            loads,
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    if "law" in result:
        law = result["law"]
        lines.append(
            f"Fit: {law['formula']} (rms log residual {law['rmse_log']:.3g}, "
            f"{law['points']} points)"
        )
    if "n_opt_law" in result:
        lines.append(f"Fit: {result['n_opt_law']['formula']}")
    for b, n, lo in result.get("optima", ()):
        lines.append(f"Budget {b:.3g}: N_opt ~ {n:,.0f}, L_opt ~ {lo:.4f}")
    if "fit_error" in result:
        lines.append(f"No fit: {result['fit_error']}")
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path, title: str) -> Path:
    from pretzel_jax.scale.powerlaw import PowerLaw

    def law(key):
        d = result.get(key)
        fields = ("a", "b", "e", "rmse_log", "points", "irreducible")
        return PowerLaw(**{k: d[k] for k in fields if k in d}) if d else None

    runs = [
        {
            "compute": r["compute"],
            "params": r["params"],
            "loss": r["loss"],
            "label": f"w{r['shape']['width']}",
            "group": (
                f"C = {r['budget']:.3g} FLOPs per run"
                if result["allocation"] == "iso"
                else f"budget {r['budget']:.3g} FLOPs split across the sizes"
            ),
            "curve": r["curve"],
        }
        for r in result["runs"]
    ]
    return plot_sweep(
        runs,
        path,
        law=law("law"),
        n_law=law("n_opt_law"),
        optima=result.get("optima", ()),
        title=title,
        ylabel=result["metric"],
    )


# -- CLI ---------------------------------------------------------------------------------------


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"{what} must be comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretzel_jax.scale.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="base experiment, e.g. experiments/x.py")
    parser.add_argument("--family", default="width=32*k", help="e.g. 'width=64*k,head_dim=32'")
    parser.add_argument("--sizes", default="1,2,3,4,5,6", help="values of k")
    parser.add_argument("--budget", default="", help="FLOPs; comma-separated for several")
    parser.add_argument("--allocation", default="ratio", choices=ALLOCATIONS)
    parser.add_argument("--out", help="sweep folder (default runs/sweep_<experiment>)")
    parser.add_argument("--plan", "--dry_run", action="store_true", help="write the plan only")
    parser.add_argument("--collect", action="store_true", help="collect, fit and plot only")
    parser.add_argument("--metric", default="eval/bits_per_dim")
    parser.add_argument("--irreducible", action="store_true", help="fit e + a * C^-b")
    parser.add_argument("--min_steps", type=int, default=20)
    parser.add_argument("--max_steps", type=int, default=0, help="0 = no limit")
    parser.add_argument("--warmup_frac", type=float, default=0.1)
    parser.add_argument("--png", help="also copy the figure here")
    args, rest = parser.parse_known_args(argv)
    try:
        return _main(args, rest, parser)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # ConfigError from the base experiment
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _main(args, rest, parser) -> int:
    from pretzel_jax.train.config import cli_overrides

    extra = cli_overrides(rest, parser.error)
    stem = Path(args.config.split(".py:")[0]).stem
    out = Path(args.out or Path("runs") / f"sweep_{stem}")
    if args.collect:
        plan = load_plan(out)
    else:
        budgets = _floats(args.budget, "--budget")
        if not budgets:
            raise SweepError("give --budget (FLOPs; e.g. 2e13, or 1e13,3e13 for several)")
        family = Family.parse(args.family)
        runs = plan_sweep(
            args.config,
            family,
            _ints(args.sizes, "--sizes"),
            budgets,
            out=out,
            allocation=args.allocation,
            extra=extra,
            min_steps=args.min_steps,
            max_steps=args.max_steps,
            warmup_frac=args.warmup_frac,
        )
        meta = {
            "config": args.config,
            "family": str(family),
            "allocation": args.allocation,
            "budgets": budgets,
            "metric": args.metric,
        }
        plan_path, sh = write_plan(runs, out, meta)
        for r in runs:
            print(
                f"{r.name}: N={r.params:,} F/step={r.flops_per_step:.3g} steps={r.steps} "
                f"C={r.compute:.3g}"
            )
        print(f"plan: {plan_path}, {sh} ({len(runs)} runs)")
        if args.plan:
            for r in runs:
                print(shlex.join(r.command))
            return 0
        plan = load_plan(out)
        launch(plan, out, args.metric)
    result = collect(plan, out, args.metric, irreducible=args.irreducible)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table(result)
    (out / "table.md").write_text(md)
    title = f"{plan['config']} family {plan['family']} ({plan['allocation']} allocation)"
    png = figure(result, out / "sweep.png", title)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, args.png)
    print(md)
    print(f"results: {out / 'results.json'}, {out / 'table.md'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
