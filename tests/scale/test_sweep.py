"""Scaling-law sweep tooling: the family rule, the plan (configs, parameter counts, FLOPs,
steps), the dry run, metrics collection, the power-law fits, the figure and bad inputs."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict
from ml_collections import ConfigDict

from pretzel_jax import models
from pretzel_jax.flow import FlowConfig
from pretzel_jax.flow.block import AFBlock
from pretzel_jax.scale import flops, sweep
from pretzel_jax.scale.powerlaw import fit_power_law, isoflop_minimum
from pretzel_jax.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT / 'experiments' / 'shapes_stage1.py'}:test"
FAMILY = "width=16*k,depth=k"
BUDGET = 1e11


@pytest.fixture(scope="module")
def missing(tmp_path_factory):
    """Overrides pointing the frozen parts' folders nowhere: the architectures come from the
    experiment (the plan reads no weights)."""
    none = tmp_path_factory.mktemp("none") / "absent"
    return [f"model.pretzel.vlm_path={none}", f"model.fae.encoder.path={none}"]


@pytest.fixture(scope="module")
def plan(missing, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    family = sweep.Family.parse(FAMILY)
    runs = sweep.plan_sweep(CONFIG, family, [2, 1], [BUDGET], out=out, extra=missing, min_steps=2)
    return runs, out


def _flow(**kw):
    base = dict(
        width=128,
        head_dim=32,
        kv_heads=None,
        layers_per_block=(2, 2, 4),
        rope="sectioned",
        rope_sections=(4, 6, 6),
    )
    return ConfigDict(base | kw)


def test_family_rule_shapes_and_overrides():
    fam = sweep.Family.parse("width=64*k, depth=k+1, head_dim=16")
    assert fam.shape(3, _flow()) == {
        "width": 192,
        "depth": 4,
        "shallow_blocks": 2,
        "shallow_depth": 2,
        "kv_heads": None,
        "head_dim": 16,
        "heads": 12,
    }
    assert fam.overrides(3, _flow()) == [
        "model.flow.width=192",
        "model.flow.head_dim=16",
        "model.flow.layers_per_block=(2,2,4)",
        "model.flow.rope_sections=(2,3,3)",  # rescaled to head_dim / 2 at the base 2:3:3 split
    ]
    heads = sweep.Family.parse("width=32*k,heads=k,shallow_blocks=1,shallow_depth=3")
    assert heads.shape(4, _flow())["head_dim"] == 32
    assert heads.overrides(4, _flow())[2] == "model.flow.layers_per_block=(3,4)"


@pytest.mark.parametrize(
    "text, match",
    [
        ("widht=64*k", "unknown family key 'widht'"),
        ("width=64*k,width=k", "given twice"),
        ("width=64*x", "integer expression in k"),
        ("width=__import__('os')", "integer expression in k"),
        ("width", "not key=expr"),
        ("heads=k,head_dim=32", "not both"),
    ],
)
def test_family_rule_errors(text, match):
    with pytest.raises(sweep.SweepError, match=match) as e:
        sweep.Family.parse(text).shape(2, _flow())
    assert "\n" not in str(e.value)


def test_family_rule_indivisible_head_dim():
    with pytest.raises(sweep.SweepError, match="not a multiple of head_dim"):
        sweep.Family.parse("width=40*k").shape(1, _flow())


def test_plan_follows_family_and_budget(plan):
    runs, out = plan
    assert [r.name for r in runs] == ["k1", "k2"]
    for r in runs:
        k = r.k
        assert f"model.flow.width={16 * k}" in r.overrides
        assert f"model.flow.layers_per_block=(1,{k})" in r.overrides
        assert r.shape["width"] == 16 * k and r.shape["depth"] == k
        assert r.command[:3] == ["python", "-m", "pretzel_jax.train"]
        assert r.command[r.command.index("--run_dir") + 1] == str(out / r.name)
        assert f"--config.train.steps={r.steps}" in r.command
        assert f"--config.train.eval_every={r.steps}" in r.command
    # ratio allocation: steps proportional to N, the runs together spend the budget.
    assert runs[1].steps / runs[0].steps == pytest.approx(runs[1].params / runs[0].params, rel=0.02)
    assert sum(r.compute for r in runs) == pytest.approx(BUDGET, rel=0.02)
    assert runs[1].params > runs[0].params


def test_plan_param_counts_match_eval_shape(plan, missing):
    """The stage-1 trainable parameters are the deep and shallow flow blocks (P_t, P_v and SOS
    included): counted here from an eval_shape of the model, by group."""
    runs, _ = plan
    for r in runs:
        cfg = load_config(CONFIG, overrides=[*r.overrides])
        abstract = nnx.eval_shape(lambda cfg=cfg: models.build(cfg, rngs=nnx.Rngs(0)))
        flat = flatten_dict(nnx.state(abstract, nnx.Param).to_pure_dict())
        flow = sum(math.prod(v.shape) for k, v in flat.items() if k[0] in ("deep", "shallow"))
        assert r.params == flow
        assert r.params_total == sum(math.prod(v.shape) for v in flat.values())


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_layer_flops_match_traced_matmuls(kv_heads):
    f = FlowConfig(token_dim=4, width=32, head_dim=16, kv_heads=kv_heads, layers_per_block=(3,))
    abstract = nnx.eval_shape(lambda: AFBlock(f, 3, "id", conditioned=False, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    t = 10
    h = jax.ShapeDtypeStruct((2, t, 32), jnp.float32)
    counted = flops.count(lambda s, h: nnx.merge(graphdef, s).hidden(h)[0], state, h)
    assert counted.matmul == 2 * 3 * sweep._layer_forward_flops(t, f)


def test_plan_flops_scale_with_batch(missing):
    one = load_config(CONFIG, overrides=missing)
    two = load_config(CONFIG, overrides=[*missing, "data.batch_size=16"])
    a, b = sweep.flow_train_flops(one), sweep.flow_train_flops(two)
    assert b["flops"] == 2 * a["flops"] == 6 * a["forward"]
    assert a["image_tokens"] == one.data.batch_size * one.data.max_images * 64


def test_dry_run_lists_commands_and_runs_nothing(tmp_path, missing, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("the dry run launched something")

    monkeypatch.setattr(sweep.subprocess, "run", refuse)
    argv = ["--config", CONFIG, "--family", FAMILY, "--sizes", "1,2", "--budget", str(BUDGET)]
    argv += ["--out", str(tmp_path), "--min_steps", "2", "--dry_run"]
    assert sweep.main(argv + [f"--config.{o}" for o in missing]) == 0
    lines = (tmp_path / "plan.sh").read_text().splitlines()[2:]
    assert len(lines) == 2 and all("-m pretzel_jax.train" in line for line in lines)
    printed = capsys.readouterr().out
    assert all(line in printed for line in lines)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["k1", "k2"]
    assert not (tmp_path / "k1").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--budget", "1e6"], "too small for the smallest model"),
        (["--budget", "1e11", "--family", "depht=k"], "unknown family key"),
        (["--budget", "1e11", "--config.train.steps=5"], "set by the sweep"),
        (["--collect"], "plan.json does not exist"),
    ],
)
def test_bad_input_one_error_line(tmp_path, missing, capsys, args, match):
    argv = ["--config", CONFIG, "--family", FAMILY, "--sizes", "1,2", "--out", str(tmp_path)]
    assert sweep.main(argv + args + [f"--config.{o}" for o in missing] + ["--plan"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def _metrics(run_dir: Path, rows) -> None:
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 3')  # a line cut by a kill


def test_final_metric_picks_the_last_eval_row(tmp_path):
    _metrics(
        tmp_path / "r",
        [
            {"step": 10, "bits_per_dim": 2.0, "loss": 0.5},
            {"step": 10, "eval/bits_per_dim": 1.9, "eval/loss": 0.4},
            {"step": 20, "bits_per_dim": 1.5, "loss": 0.2},
            {"step": 20, "eval/bits_per_dim": 1.4, "eval/loss": 0.1},
            {"step": 20, "report/image_bits_per_dim": 1.3},
        ],
    )
    assert sweep.final_metric(tmp_path / "r") == (20, 1.4)
    assert sweep.final_metric(tmp_path / "r", "eval/loss") == (20, 0.1)
    with pytest.raises(sweep.SweepError, match="no 'eval/nll' row .*eval/bits_per_dim"):
        sweep.final_metric(tmp_path / "r", "eval/nll")
    with pytest.raises(sweep.SweepError, match="has no metrics.jsonl") as e:
        sweep.final_metric(tmp_path / "absent")
    assert "\n" not in str(e.value)


def test_power_law_fit_recovers_known_laws():
    c = np.geomspace(1e10, 1e14, 8)
    law = fit_power_law(c, 3.0 * c**-0.07)
    assert law.a == pytest.approx(3.0, rel=1e-6) and law.b == pytest.approx(0.07, rel=1e-6)
    assert law.e == 0 and law.rmse_log < 1e-9
    law = fit_power_law(c, 0.6 + 40.0 * c**-0.15, irreducible=True)
    assert law.e == pytest.approx(0.6, rel=1e-3)
    assert law.a == pytest.approx(40.0, rel=2e-2) and law.b == pytest.approx(0.15, rel=2e-3)
    n = np.geomspace(1e5, 1e7, 5)
    n_opt, l_opt = isoflop_minimum(n, 1.0 + 0.1 * (np.log(n) - np.log(1e6)) ** 2)
    assert n_opt == pytest.approx(1e6, rel=1e-6) and l_opt == pytest.approx(1.0)


def test_collect_fits_tables_and_plots(tmp_path):
    """Collected runs (ratio allocation) -> the law of their final evals, a table, a PNG."""
    runs = []
    for i, (n, steps) in enumerate([(1000, 10), (4000, 40), (16000, 160)]):
        run = {"name": f"k{i}", "k": i, "budget": 1e9, "params": n, "steps": steps}
        run |= {"flops_per_step": 100 * n, "shape": {"width": 8 * i, "depth": 2, "heads": 1}}
        run |= {"compute": 100.0 * n * steps, "six_nd": 6.0 * n * steps}
        loss = 5.0 * run["compute"] ** -0.1
        _metrics(
            tmp_path / run["name"],
            [
                {"step": steps // 2, "bits_per_dim": 2 * loss},
                {"step": steps, "bits_per_dim": 1.1 * loss},
                {"step": steps, "eval/bits_per_dim": loss},
            ],
        )
        runs.append(run)
    plan = {"allocation": "ratio", "runs": runs}
    result = sweep.collect(plan, tmp_path, "eval/bits_per_dim")
    assert result["law"]["b"] == pytest.approx(0.1, rel=1e-6)
    assert [len(r["curve"]) for r in result["runs"]] == [2, 2, 2]
    md = sweep.table(result)
    assert md.count("\n| k") == 3 and "L(C) = 5 * C^-0.1" in md
    png = sweep.figure(result, tmp_path / "sweep.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan["runs"][0] = plan["runs"][0] | {"steps": 1000}
    with pytest.raises(sweep.SweepError, match="at step 10 of 1000"):
        sweep.collect(plan, tmp_path, "eval/bits_per_dim")


def test_collect_isoflop_budgets_fit_n_opt(tmp_path):
    """Iso allocation, two budgets: the best size of each (parabola in log N) and N_opt(C)."""
    runs = []
    for budget, best in [(1e12, 2000.0), (1e13, 8000.0)]:
        for n in (500, 1000, 2000, 4000, 8000, 16000, 32000):
            name = f"C{budget:.0e}_k{n}"
            run = {"name": name, "k": n, "budget": budget, "params": n, "steps": 10}
            run |= {"flops_per_step": budget / 10, "shape": {"width": 8, "depth": 2, "heads": 1}}
            run |= {"compute": budget, "six_nd": 1.0}
            loss = 2.0 * (budget / 1e12) ** -0.2 + 0.05 * (math.log(n) - math.log(best)) ** 2
            _metrics(tmp_path / name, [{"step": 10, "eval/bits_per_dim": loss}])
            runs.append(run)
    result = sweep.collect({"allocation": "iso", "runs": runs}, tmp_path, "eval/bits_per_dim")
    (_, n1, l1), (_, n2, l2) = result["optima"]
    assert n1 == pytest.approx(2000.0, rel=1e-6) and n2 == pytest.approx(8000.0, rel=1e-6)
    assert result["n_opt_law"]["b"] == pytest.approx(-math.log10(4), rel=1e-6)
    assert result["law"]["b"] == pytest.approx(0.2, rel=1e-6)
    assert "N_opt(C) =" in sweep.table(result)
    sweep.figure(result, tmp_path / "iso.png", "iso")
