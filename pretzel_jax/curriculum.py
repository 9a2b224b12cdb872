"""Runs a curriculum (an ordered list of data, training and report steps) with one command:

    python -m pretzel_jax.curriculum --config experiments/shapes_curriculum.py [--dry_run]
        [--only STEP | --from STEP] [--config.runs_dir=DIR --config.data_dir=DIR ...]

Each training step is `python -m pretzel_jax.train --config <experiment> --run_dir <run_dir>
--config.<override> ...` in a child process, its output shown and appended to
`<runs_dir>/curriculum/<step>.log`. A step whose done markers exist is skipped; one whose run dir
has checkpoints but no marker is rerun with the same command (the trainer resumes from its newest
checkpoint). Start, end, wall seconds and exit code of every attempt go to
`<runs_dir>/curriculum/steps.json`. A failing step stops the run; SIGINT (Ctrl-C) or SIGTERM is
passed to the child as SIGTERM (the trainer checkpoints at the next step boundary and stops; a
second signal kills it). In every case rerunning the same command resumes.

The curriculum file defines `get_config(arg=None)` returning a ConfigDict with `data_dir`,
`runs_dir` and `steps` (see experiments/shapes_curriculum.py for the fields of a step).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pretzel_jax.train.config import CLI_PREFIX as _PREFIX
from pretzel_jax.train.config import cli_overrides

KINDS = ("prepare", "train", "report")
STATE_DIR = "curriculum"  # under runs_dir: steps.json, <step>.log, summary.json, summary.md


class CurriculumError(Exception):
    """A bad curriculum file, config or command line (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One step with every template resolved."""

    name: str
    kind: str
    run_dir: Path
    done: tuple[str, ...]  # files or globs relative to run_dir
    commands: tuple[tuple[str, ...], ...]  # argv of each child process, run in order
    experiment: str = ""
    headline: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """The done markers that do not exist (all of them when there is none)."""
        return [m for m in self.done if not glob.glob(str(self.run_dir / m))]

    def is_done(self) -> bool:
        return bool(self.done) and not self.missing()

    def has_checkpoints(self) -> bool:
        ckpt = self.run_dir / "checkpoints"
        return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())

    def status(self) -> str:
        """'done', 'resume' (checkpoints, no done marker) or 'todo'."""
        if self.is_done():
            return "done"
        return "resume" if self.kind == "train" and self.has_checkpoints() else "todo"


@dataclasses.dataclass(frozen=True)
class Plan:
    config: object  # the curriculum ConfigDict
    runs_dir: Path
    data_dir: Path
    steps: tuple[Step, ...]

    @property
    def state_dir(self) -> Path:
        return self.runs_dir / STATE_DIR

    def log_path(self, step: Step) -> Path:
        return self.state_dir / f"{step.name}.log"

    def select(self, only: str | None = None, start: str | None = None) -> list[Step]:
        names = [s.name for s in self.steps]
        for flag, name in (("--only", only), ("--from", start)):
            if name is not None and name not in names:
                raise CurriculumError(f"{flag} {name}: no such step; the steps are {names}")
        if only is not None:
            return [s for s in self.steps if s.name == only]
        if start is not None:
            return list(self.steps[names.index(start) :])
        return list(self.steps)


# -- the plan --------------------------------------------------------------------------------


def load_config(target: str, overrides: Sequence[str] = ()):
    """The curriculum ConfigDict of `file.py[:arg]` with `"key=value"` overrides applied."""
    from ml_collections import ConfigDict

    from pretzel_jax.train.config import apply_overrides

    path, arg = _split(target)
    if not path.is_file():
        raise CurriculumError(f"curriculum file {path} does not exist; check the --config path")
    spec = importlib.util.spec_from_file_location(f"_curriculum_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CurriculumError(f"{path}: get_config({arg or None!r}) failed: {e}") from e
    if not isinstance(config, ConfigDict):
        raise CurriculumError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    apply_overrides(config, overrides)
    return config


def _split(target: str) -> tuple[Path, str]:
    """ "dir/x.py:arg" -> (Path("dir/x.py"), "arg")."""
    file, sep, arg = target.partition(".py:")
    return Path(file + ".py" if sep else file), arg


def _fill(text: str, values: dict[str, str], where: str) -> str:
    try:
        return text.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise CurriculumError(
            f"{where}={text!r}: bad template ({e!r}); use {{runs}} and {{data}}"
        ) from None


def _experiment(experiment: str, base_dir: str | Path) -> str:
    """`file.py[:arg]` as given when the file exists from the working directory, else next to the
    curriculum file."""
    file, arg = _split(experiment)
    if not file.exists() and (Path(base_dir) / file.name).exists():
        file = Path(base_dir) / file.name
    return f"{file}:{arg}" if arg else str(file)


def make_plan(config, *, base_dir: str | Path = ".", python: str | None = None) -> Plan:
    """Resolve templates and build each step's commands. Relative experiment paths are taken
    from the working directory, else from `base_dir` (the curriculum file's folder)."""
    python = python or sys.executable
    if not config.runs_dir:
        raise CurriculumError("runs_dir is empty: pass --config.runs_dir=DIR (a scratch folder)")
    if not config.data_dir:
        raise CurriculumError("data_dir is empty: pass --config.data_dir=DIR")
    values = {"runs": str(config.runs_dir), "data": str(config.data_dir)}
    steps, seen = [], set()
    for i, entry in enumerate(config.steps):
        if not hasattr(entry, "get"):
            raise CurriculumError(
                f"steps[{i}]={entry!r} is not a step entry (a dict or ConfigDict)"
            )
        name = entry.get("name", "")
        where = f"steps[{i}] ({name or '?'})"
        kind = entry.get("kind", "")
        if not name or name in seen:
            raise CurriculumError(f"{where}: every step needs a unique name")
        if kind not in KINDS:
            raise CurriculumError(f"{where}.kind={kind!r}: use one of {KINDS}")
        seen.add(name)
        run_dir = Path(_fill(entry.get("run_dir", ""), values, f"{where}.run_dir"))
        done = tuple(_fill(m, values, f"{where}.done") for m in entry.get("done", ()))
        overrides = tuple(
            _fill(o, values, f"{where}.overrides") for o in entry.get("overrides", ())
        )
        experiment, commands = "", ()
        if kind == "train":
            if not entry.get("experiment") or not done:
                raise CurriculumError(f"{where}: a train step needs an experiment and done markers")
            experiment = _experiment(entry.experiment, base_dir)
            argv = [python, "-m", "pretzel_jax.train", "--config", experiment]
            argv += ["--run_dir", str(run_dir)] + [_PREFIX + o for o in overrides]
            commands = (tuple(argv),)
        elif kind == "prepare":
            names = [a for d in entry.get("datasets", ()) for a in ("--name", d)]
            argv = [python, "-m", "pretzel_jax.data.prepare", *names, "--data_dir", str(run_dir)]
            commands = ((*argv, "--workers", str(entry.get("workers", 1))),)
        steps.append(
            Step(
                name,
                kind,
                run_dir,
                done,
                commands,
                experiment,
                tuple(entry.get("headline", ())),
            )
        )
    return Plan(config, Path(config.runs_dir), Path(config.data_dir), tuple(steps))


def describe(plan: Plan, selected: Sequence[Step]) -> str:
    """The dry-run text: each step, its status and what would run."""
    chosen = {s.name for s in selected}
    lines = [f"curriculum: runs_dir={plan.runs_dir} data_dir={plan.data_dir}"]
    for i, step in enumerate(plan.steps, 1):
        status = step.status()
        if step.name not in chosen:
            action = "not selected"
        elif status == "done":
            action = "done: skip"
        elif status == "resume":
            action = "checkpoints, no done marker: resume"
        elif step.kind == "report":
            action = "write summary.json, summary.md"
        else:
            action = "run"
        lines.append(f"{i:2d}. {step.name:<14} [{action}]  {step.run_dir}")
        if step.done:
            missing = set(step.missing())
            marks = ", ".join(f"{m}{'' if m in missing else ' (ok)'}" for m in step.done)
            lines.append(f"      done when: {marks}")
        for argv in step.commands:
            lines.append("      $ " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    exit_code: int
    signal: int | None = None  # the signal the curriculum received while the child ran


Runner = Callable[[Sequence[str], Path], Outcome]


def run_command(argv: Sequence[str], log_path: Path, echo=None) -> Outcome:
    """Run `argv`, copying its output (stdout + stderr) to `echo` (default stdout) and appending
    it to `log_path`. SIGINT (Ctrl-C) and SIGTERM received meanwhile are passed on as SIGTERM (a
    second one kills the child). The child starts with SIGINT ignored, so that a terminal's
    Ctrl-C, sent to the whole process group, reaches it only as our SIGTERM."""
    echo = echo or sys.stdout.buffer
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        received.append(signum)
        if len(received) == 1:
            note = f"\n[curriculum] {signal.Signals(signum).name}: asking the step to stop "
            note += "(SIGTERM: the trainer checkpoints and exits); again to kill it\n"
        else:
            note = "\n[curriculum] killing the step\n"
        if procs:
            procs[0].send_signal(signal.SIGTERM) if len(received) == 1 else procs[0].kill()
        os.write(2, note.encode())  # not print: the handler may interrupt a write

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child (see above)
    code = 0
    try:
        with open(log_path, "ab") as log:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            log.write(f"\n=== {stamp} $ {shlex.join(argv)}\n".encode())
            log.flush()
            if received:  # before the child started: do not start it
                return Outcome(code, received[0])
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            procs.append(proc)
            if handlers:
                signal.signal(signal.SIGINT, forward)
            if received:  # while it started
                proc.send_signal(signal.SIGTERM)
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 1 << 16):
                log.write(chunk)
                log.flush()
                if echo is not None:
                    try:
                        echo.write(chunk)
                        echo.flush()
                    except (OSError, ValueError):  # the console went away: keep the log
                        echo = None
            code = proc.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for proc in procs:
            if proc.poll() is None:  # we failed while it runs: let it checkpoint, then kill it
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()
    return Outcome(code, received[0] if received else None)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Record:
    """`<runs_dir>/curriculum/steps.json`: per step its status, log and every attempt."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"steps": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
                self.data.setdefault("steps", {})
            except (json.JSONDecodeError, OSError):
                self.path.replace(path.with_suffix(".json.corrupt"))

    def step(self, name: str) -> dict:
        return self.data["steps"].setdefault(name, {"attempts": []})

    def save(self) -> None:
        self.data["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def _say(text: str) -> None:
    print(f"[curriculum] {text}", flush=True)


def run(plan: Plan, selected: Sequence[Step], runner: Runner = run_command) -> int:
    """Run the selected steps in order; returns the exit code of the whole command."""
    record = Record(plan.state_dir / "steps.json")
    record.data["runs_dir"], record.data["data_dir"] = str(plan.runs_dir), str(plan.data_dir)
    for step in selected:
        entry = record.step(step.name)
        status = step.status()
        if status == "done":
            _say(f"{step.name}: done ({', '.join(step.done)} in {step.run_dir}); skipping")
            entry["status"] = "done"
            record.save()
            continue
        if status == "resume":
            _say(f"{step.name}: checkpoints in {step.run_dir} but no done marker; resuming")
        else:
            _say(f"{step.name}: running ({step.run_dir})")
        log = plan.log_path(step)
        attempt = {"start": _now(), "end": None, "wall_s": None, "exit_code": None}
        entry.update(status="running", log=str(log), commands=[list(c) for c in step.commands])
        if status == "todo":  # a fresh start: earlier attempts made nothing that is left
            entry["attempts"] = []
        entry["attempts"].append(attempt)
        record.save()
        t0, outcome = time.monotonic(), Outcome(0)
        if step.kind == "report":
            write_summary(plan, record)
        for argv in step.commands:
            outcome = runner(argv, log)
            if outcome.exit_code or outcome.signal:
                break
        wall = time.monotonic() - t0
        attempt.update(end=_now(), wall_s=round(wall, 3), exit_code=outcome.exit_code)
        total = sum(a["wall_s"] or 0.0 for a in entry["attempts"])
        entry.update({k: attempt[k] for k in ("start", "end", "wall_s", "exit_code")})
        entry["total_wall_s"] = round(total, 3)
        how = "rerun the same command to resume"
        if outcome.signal is not None:
            entry["status"] = attempt["status"] = "interrupted"
            record.save()
            name = signal.Signals(outcome.signal).name
            _say(f"{name}: stopped during step {step.name!r} (log: {log}); {how}")
            return 128 + outcome.signal
        if outcome.exit_code:
            entry["status"] = attempt["status"] = "failed"
            record.save()
            _say(f"step {step.name!r} failed (exit {outcome.exit_code}); log: {log}; fix it, {how}")
            return 1
        if step.done and not step.is_done():
            entry["status"] = attempt["status"] = "incomplete"
            record.save()
            _say(
                f"step {step.name!r} exited without its done markers ({', '.join(step.missing())} "
                f"missing in {step.run_dir}; was it stopped?); log: {log}; {how}"
            )
            return 1
        entry["status"] = attempt["status"] = "done"
        record.save()
        _say(f"{step.name}: finished in {_duration(wall)}")
        if step.kind == "report":
            print((plan.state_dir / "summary.md").read_text(), flush=True)
    return 0


# -- the summary -----------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    if hours:
        return f"{hours} h {m} min"
    return f"{m} min {s} s" if m else f"{s} s"


def _number(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def summarize(plan: Plan, record: Record | None = None) -> dict:
    """Per training step: status, wall seconds (all attempts), and the headline numbers of its
    report.json (its every top-level number when the step names no headline keys)."""
    record = record or Record(plan.state_dir / "steps.json")
    steps = {}
    for step in plan.steps:
        if step.kind == "report":
            continue
        entry = record.data["steps"].get(step.name, {})
        row = {
            "status": "done" if step.is_done() else entry.get("status") or step.status(),
            "run_dir": str(step.run_dir),
            "wall_s": entry.get("total_wall_s"),
            "attempts": len(entry.get("attempts", [])),
        }
        report = step.run_dir / "report.json"
        if step.kind == "train" and report.is_file():
            values = json.loads(report.read_text())
            numbers = {
                k: v
                for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            keys = step.headline or tuple(numbers)
            row["report"] = str(report)
            row["headline"] = {k: numbers[k] for k in keys if k in numbers}
        steps[step.name] = row
    walls = [r["wall_s"] for r in steps.values() if r["wall_s"] is not None]
    runs = str(plan.runs_dir)
    total = round(sum(walls), 3)
    return {"written": _now(), "runs_dir": runs, "total_wall_s": total, "steps": steps}


def markdown(summary: dict) -> str:
    lines = [
        "| step | status | wall | headline (report.json) |",
        "|---|---|---|---|",
    ]
    for name, row in summary["steps"].items():
        head = ", ".join(f"{k} {_number(v)}" for k, v in row.get("headline", {}).items())
        lines.append(f"| {name} | {row['status']} | {_duration(row['wall_s'])} | {head} |")
    lines.append(f"| total | | {_duration(summary['total_wall_s'])} | |")
    return "\n".join(lines) + "\n"


def write_summary(plan: Plan, record: Record | None = None) -> dict:
    summary = summarize(plan, record)
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    (plan.state_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (plan.state_dir / "summary.md").write_text(markdown(summary))
    return summary


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, runner: Runner = run_command) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretzel_jax.curriculum",
        description="Run a curriculum's steps in order (skipping finished ones, resuming "
        "interrupted ones). Overrides of the curriculum config: --config.KEY=VALUE, e.g. "
        "--config.runs_dir=DIR --config.data_dir=DIR.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="curriculum file[:arg]")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and each status")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STEP", help="run this step alone (unless done)")
    group.add_argument("--from", dest="start", metavar="STEP", help="run from this step on")
    args, rest = parser.parse_known_args(argv)
    overrides = cli_overrides(rest, parser.error)
    from pretzel_jax.train.errors import ConfigError

    try:
        config = load_config(args.config, overrides)
        plan = make_plan(config, base_dir=_split(args.config)[0].parent)
        selected = plan.select(args.only, args.start)
    except (CurriculumError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(plan, selected))
        return 0
    try:
        return run(plan, selected, runner)
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
