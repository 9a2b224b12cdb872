"""The curriculum runner: the shapes plan and its dry run, templated paths (nothing under runs/
when runs_dir is elsewhere), done-marker skipping, resuming, failures and interrupts. No real
training runs here: a fake runner stands in for the child processes (and a tiny python child
for the real runner's streaming and signal forwarding)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from pretzel_jax import curriculum
from pretzel_jax.curriculum import Outcome, main
from pretzel_jax.train.config import load_config as load_experiment

CONFIG = "experiments/shapes_curriculum.py"
NAMES = [
    "data",
    "stage0_tower",
    "stage0_vlm",
    "fae",
    "stage1",
    "stage2",
    "stage3",
    "report",
]


def _plan(tmp_path: Path, arg: str = "test"):
    overrides = [f"runs_dir={tmp_path / 'elsewhere'}", f"data_dir={tmp_path / 'data'}"]
    config = curriculum.load_config(f"{CONFIG}:{arg}" if arg else CONFIG, overrides)
    return curriculum.make_plan(config)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config",
        f"{CONFIG}:test",
        f"--config.runs_dir={tmp_path / 'elsewhere'}",
        f"--config.data_dir={tmp_path / 'data'}",
        *extra,
    ]


class FakeRunner:
    """Records each command; writes the done markers (and a report.json with the step's
    headline keys) of the step it belongs to, unless told to fail or to stop short."""

    def __init__(self, plan, fail: str | None = None, short: str | None = None, code: int = 1):
        self.plan, self.fail, self.short, self.code = plan, fail, short, code
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv, log_path: Path) -> Outcome:
        self.calls.append(tuple(argv))
        step = next(s for s in self.plan.steps if tuple(argv) in s.commands)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"fake {step.name}\n")
        if step.name == self.fail:
            return Outcome(self.code)
        if step.name != self.short:
            for marker in step.done:
                path = step.run_dir / marker.replace("[0-9]*", "1.0.0")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({k: 0.5 for k in step.headline} | {"examples": {}}))
        return Outcome(0)


def test_shapes_plan_and_dry_run(tmp_path, capsys):
    full = _plan(tmp_path, arg="")
    assert [s.name for s in full.steps] == NAMES
    by_name = {s.name: s for s in full.steps}
    assert by_name["stage0_vlm"].done == ("report.json", "hf/config.json", "hf/model.safetensors")
    assert by_name["fae"].experiment == "experiments/shapes_fae.py"
    assert any("shapes_fae/fae.safetensors" in a for a in by_name["stage1"].commands[0])
    assert "pretzel.safetensors" in by_name["stage2"].done
    data = by_name["data"]
    (argv,) = data.commands
    assert argv[-2:] == ("--workers", "2")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--name"] == [
        f"shapes_{d}" for d in ("cells", "vqa", "captions", "images", "interleaved", "edits")
    ]
    assert len(data.done) == len(set(data.done)) == 4  # cells/images are views of captions
    test = _plan(tmp_path)
    assert all(
        s.experiment.endswith(("py:test", "py:adapt_test")) for s in test.steps if s.kind == "train"
    )
    assert all("_tiny" in c[c.index("--name") + 1] for c in test.steps[0].commands)

    # Statuses: a run dir with checkpoints is resumed; one with every marker is skipped.
    stage1 = {s.name: s for s in test.steps}["stage1"]
    (stage1.run_dir / "checkpoints" / "2").mkdir(parents=True)
    tower = test.steps[1]
    tower.run_dir.mkdir(parents=True)
    for marker in tower.done:
        (tower.run_dir / marker).write_text("{}")
    assert main(_args(tmp_path, "--dry_run")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for i, name in enumerate(NAMES, 1):
        assert any(line.startswith(f"{i:2d}. {name} ") for line in lines), name
    assert "stage0_tower   [done: skip]" in out
    assert "stage1         [checkpoints, no done marker: resume]" in out
    assert "stage2         [run]" in out
    assert "report.json (ok), tower.safetensors (ok)" in out
    assert "-m pretzel_jax.train --config experiments/shapes_stage3.py:test --run_dir" in out
    assert not (tmp_path / "elsewhere" / "curriculum").exists()  # a dry run writes nothing

    assert main(_args(tmp_path, "--dry_run", "--from", "stage2")) == 0
    out = capsys.readouterr().out
    assert "stage1         [not selected]" in out and "stage3         [run]" in out
    assert main(_args(tmp_path, "--dry_run", "--only", "nope")) == 2
    assert "--only nope: no such step" in capsys.readouterr().err
    assert main(["--config", f"{CONFIG}:test", "--dry_run"]) == 2  # :test needs a runs_dir
    assert "--config.runs_dir=DIR" in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["", "test"])
def test_every_path_lands_under_the_given_dirs(tmp_path, arg):
    plan = _plan(tmp_path, arg)
    for step in plan.steps:
        for argv in step.commands:
            assert not any("runs/" in a or "data_cache" in a for a in argv), argv
    # Each experiment's config with the step's overrides: no string left pointing at runs/ or
    # data_cache (run_dir is --run_dir's), every runs path in the given runs_dir.
    for step in plan.steps:
        if step.kind != "train":
            continue
        argv = step.commands[0]
        overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
        config = load_experiment(step.experiment, overrides=overrides)
        assert argv[argv.index("--run_dir") + 1] == str(step.run_dir)
        strings = _strings(config)
        bad = {
            k: v
            for k, v in strings.items()
            if k != "run_dir" and ("runs/" in v or "data_cache" in v)
        }
        assert not bad, (step.name, bad)
        assert config.data.data_dir == str(tmp_path / "data")
        for key, value in strings.items():
            if key.endswith(("path", "init_from", "vision_init")) and value:
                assert value.startswith(str(tmp_path / "elsewhere")), (step.name, key, value)


def _strings(config, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            out |= _strings(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            out[prefix + key] = value
    return out


def test_run_skips_done_steps_and_resumes_with_the_same_command(tmp_path, capsys):
    plan = _plan(tmp_path)
    fake = FakeRunner(plan)
    assert main(_args(tmp_path), runner=fake) == 0
    first = list(fake.calls)
    assert len(first) == 1 + 6  # one prepare command, six trainings
    order = [next(s.name for s in plan.steps if c in s.commands) for c in first]
    assert list(dict.fromkeys(order)) == NAMES[:-1]
    state = plan.state_dir
    steps = json.loads((state / "steps.json").read_text())["steps"]
    for name in NAMES:
        entry = steps[name]
        assert entry["status"] == "done" and entry["exit_code"] == 0, name
        assert entry["wall_s"] >= 0 and entry["start"] <= entry["end"]
        assert entry["log"] == str(state / f"{name}.log")
    assert "fake stage1" in (state / "stage1.log").read_text()
    summary = json.loads((state / "summary.json").read_text())
    assert list(summary["steps"]) == NAMES[:-1]
    assert summary["steps"]["stage1"]["headline"] == {
        "image_bits_per_dim": 0.5,
        "t2i_overall": 0.5,
        "t2i_heldout_overall": 0.5,
    }
    md = (state / "summary.md").read_text()
    assert md.startswith("| step | status | wall |") and "| stage3 | done |" in md
    capsys.readouterr()

    # Everything done: a rerun runs nothing and says so.
    fake.calls.clear()
    assert main(_args(tmp_path), runner=fake) == 0
    assert fake.calls == []
    out = capsys.readouterr().out
    assert "stage2: done (report.json, pretzel.safetensors in" in out and "skipping" in out

    # Stage 2 stopped after a checkpoint (no report.json): rerun with the same command.
    stage2 = {s.name: s for s in plan.steps}["stage2"]
    (stage2.run_dir / "report.json").unlink()
    (stage2.run_dir / "checkpoints" / "2").mkdir(parents=True)
    assert main(_args(tmp_path), runner=fake) == 0
    assert fake.calls == [c for c in first if c in stage2.commands]
    assert "stage2: checkpoints in" in capsys.readouterr().out
    steps = json.loads((state / "steps.json").read_text())["steps"]
    assert len(steps["stage2"]["attempts"]) == 2 and len(steps["stage1"]["attempts"]) == 1
    assert steps["stage2"]["total_wall_s"] >= steps["stage2"]["wall_s"]

    # --only runs one step (skipped here: done); a run dir removed is started afresh.
    fake.calls.clear()
    assert main(_args(tmp_path, "--only", "stage3"), runner=fake) == 0
    assert fake.calls == []
    stage3 = {s.name: s for s in plan.steps}["stage3"]
    shutil.rmtree(stage3.run_dir)
    assert main(_args(tmp_path, "--only", "stage3"), runner=fake) == 0
    assert fake.calls == list(stage3.commands)
    steps = json.loads((state / "steps.json").read_text())["steps"]
    assert len(steps["stage3"]["attempts"]) == 1 and len(steps["stage2"]["attempts"]) == 2


def test_a_failing_step_stops_the_run_and_names_its_log(tmp_path, capsys):
    plan = _plan(tmp_path)
    fake = FakeRunner(plan, fail="stage0_vlm", code=3)
    assert main(_args(tmp_path), runner=fake) == 1
    called = {next(s.name for s in plan.steps if c in s.commands) for c in fake.calls}
    assert called == {"data", "stage0_tower", "stage0_vlm"}
    log = plan.state_dir / "stage0_vlm.log"
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "failed" in x)
    assert "'stage0_vlm' failed (exit 3)" in line and str(log) in line
    assert "rerun the same command to resume" in line
    entry = json.loads((plan.state_dir / "steps.json").read_text())["steps"]["stage0_vlm"]
    assert entry["status"] == "failed" and entry["exit_code"] == 3

    # A child that exits 0 without its done markers (stopped by a SIGTERM of its own) is no
    # success either.
    fake = FakeRunner(plan, short="stage0_vlm")
    assert main(_args(tmp_path), runner=fake) == 1
    out = capsys.readouterr().out
    assert "'stage0_vlm' exited without its done markers (report.json" in out
    assert str(log) in out

    # An interrupt recorded by the runner: exit 128 + signal, status interrupted.
    def interrupted(argv, log_path):
        return Outcome(0, signal.SIGINT)

    assert main(_args(tmp_path), runner=interrupted) == 130
    assert "SIGINT: stopped during step 'stage0_vlm'" in capsys.readouterr().out
    entry = json.loads((plan.state_dir / "steps.json").read_text())["steps"]["stage0_vlm"]
    assert entry["status"] == "interrupted" and entry["exit_code"] == 0
    # No checkpoint was left by the earlier attempts: each started afresh, alone on record.
    assert len(entry["attempts"]) == 1


CHILD = """
import signal, sys, time
def stop(signum, frame):
    print("child got", signal.Signals(signum).name, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("sigint ignored:", signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
print("child", "ready", flush=True)  # the log's header holds this source: not this text
time.sleep(60)
print("not interrupted")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_command_streams_output_and_forwards_signals_as_sigterm(tmp_path, signum):
    log = tmp_path / "logs" / "x.log"
    echo = io.BytesIO()
    out = curriculum.run_command([sys.executable, "-c", "print('hello'); exit(4)"], log, echo)
    assert out == Outcome(4, None)
    assert b"hello" in echo.getvalue() and "hello" in log.read_text()

    def send_when_ready():
        deadline = time.monotonic() + 30
        while "child ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sender = threading.Thread(target=send_when_ready)
    sender.start()
    out = curriculum.run_command([sys.executable, "-c", CHILD], log, echo)
    sender.join()
    assert out == Outcome(0, signum)
    text = log.read_text()
    assert text.count("\n=== ") == 2  # one header per attempt, appended
    # After the header (which holds CHILD's source): the child's output alone. A terminal's
    # Ctrl-C (sent to the whole process group) cannot reach it: it starts with SIGINT ignored.
    expected = "sigint ignored: True\nchild ready\nchild got SIGTERM\n"
    assert text.endswith("'\n" + expected)
    assert echo.getvalue().endswith(expected.encode())
    assert {s: signal.getsignal(s) for s in before} == before
