"""Two processes on this machine train the digits flow over one mesh (`jax.distributed` on CPU,
Gloo collectives, 2 devices each), through the CLI's `main` (`--distributed --coordinator_address
localhost:PORT --num_processes 2 --process_id i`), sharing one run dir.

The drill: SIGKILL one process just after the first checkpoint is committed; the other is left
stranded in a collective (it errors out, or is killed after a grace period, as a cluster
scheduler would restart the whole job); restart both. The run ends in the same state, bit for
bit, as an uninterrupted 2-process run, and metrics.jsonl holds each step once.

The drill runs as this file's script (`python test_multihost.py ROOT DATA_DIR`): one parent
imports everything once and forks the training processes (as kill_drill.py does), so a start
costs setup, not imports. Every wait has a timeout; the test kills the drill's whole process
group on the way out, so a stuck collective cannot hang the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train_kill import _rows  # also puts the repository root on sys.path (kill_drill)

from pretzel_jax.data import prepare_dataset
from pretzel_jax.train.__main__ import main

PROCESSES = 2
DEVICES = 2  # per process
STEPS = 4  # the :test size checkpoints every 2 steps: killed after step 2's, it redoes 3 and 4
EXPERIMENT = "experiments/digits_flow.py:test"
ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240  # one whole 2-process run (20-50 s on 2 cores)
GRACE_S = 2  # how long the survivor of a kill may take to exit by itself


# --- the drill (this file run as a script) ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child(argv: list[str], log: Path) -> None:
    """One training process: the CLI's main on `argv`, output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        code = main(argv)
        if code == 0:  # what the CLI's exit does: every process leaves together
            jax.distributed.shutdown()
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Job:
    """Every process of a localhost cluster; logs in `run_dir/../<name>.<i>.log`."""

    def __init__(self, run_dir: Path, data_dir: str, name: str):
        address = f"localhost:{_free_port()}"
        self.logs = [run_dir.parent / f"{name}.{i}.log" for i in range(PROCESSES)]
        self.pids: list[int] = []
        self.status: dict[int, int] = {}  # pid -> waitpid status, once exited
        for i, log in enumerate(self.logs):
            argv = [
                *("--distributed", "--coordinator_address", address),
                *("--num_processes", str(PROCESSES), "--process_id", str(i)),
                *("--config", EXPERIMENT, f"--config.data.data_dir={data_dir}"),
                f"--config.train.steps={STEPS}",
                *("--run_dir", str(run_dir)),
            ]
            pid = os.fork()
            if pid == 0:
                _child(argv, log)
            self.pids.append(pid)

    def poll(self, pid: int) -> int | None:
        if pid not in self.status:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.status[pid] = status
        return self.status.get(pid)

    def wait(self, pids: list[int], timeout: float) -> bool:
        """Whether every one of `pids` exited within `timeout`."""
        deadline = time.monotonic() + timeout
        while any(self.poll(p) is None for p in pids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self, pids: list[int] | None = None) -> None:
        for pid in self.pids if pids is None else pids:
            if self.poll(pid) is None:
                os.kill(pid, signal.SIGKILL)
                _, self.status[pid] = os.waitpid(pid, 0)

    def fail(self, why: str) -> None:
        self.kill()
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)
        raise SystemExit(f"{why}\n{tails}")

    def finish(self) -> None:
        """Wait for a whole run; every process must exit 0."""
        if not self.wait(self.pids, RUN_TIMEOUT_S):
            self.fail(f"the 2-process run took over {RUN_TIMEOUT_S} s")
        if any(self.status[p] != 0 for p in self.pids):
            self.fail(f"a process failed (wait statuses {[self.status[p] for p in self.pids]})")


def _outcome(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def drill(root: Path, data_dir: str) -> dict:
    """Reference run, then a run whose process 1 is SIGKILLed after checkpoint 2, then both
    restarted. Returns what happened (times in seconds)."""
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    import pretzel_jax.eval.image_flow_report  # noqa: F401  (imported before forking, once)
    import pretzel_jax.models  # noqa: F401

    times, start = {}, time.monotonic()
    Job(root / "reference", data_dir, "reference").finish()
    times["reference_s"] = time.monotonic() - start

    start, run_dir = time.monotonic(), root / "drill"
    job = Job(run_dir, data_dir, "drill")
    first = run_dir / "checkpoints" / "2"  # Orbax renames a step's folder to this once committed
    while not first.exists():
        exited = [p for p in job.pids if job.poll(p) is not None]
        if exited or time.monotonic() - start > RUN_TIMEOUT_S:
            job.fail(f"{first} never appeared")
        time.sleep(0.02)
    survivor, victim = job.pids
    job.kill([victim])
    if not job.wait([survivor], GRACE_S):
        job.kill([survivor])
    times["killed_run_s"] = time.monotonic() - start
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())

    start = time.monotonic()
    Job(run_dir, data_dir, "resumed").finish()
    times["resumed_s"] = time.monotonic() - start
    return {"survivor": _outcome(job.status[survivor]), "checkpoints": steps, **times}


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data")
    prepare_dataset("digits", str(path))
    return str(path)


def _env() -> dict[str, str]:
    """DEVICES CPU devices per process (not the suite's 8); the shared compilation cache keeps
    every program, so restarts load what the reference run compiled."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES}"]),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _state(run_dir: Path) -> dict[str, np.ndarray]:
    """The final checkpoint's state arrays, read as numpy (the writers' devices are gone)."""
    path = run_dir / "checkpoints" / str(STEPS) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(path, restore_args=args)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state)}


@pytest.mark.slow
def test_sigkill_one_process_then_restart_both_resumes_bit_for_bit(data_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), data_dir],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the drill and its training processes: one group to kill
    )
    try:
        out, err = proc.communicate(timeout=3 * RUN_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, err[-6000:]
    summary = json.loads(out.splitlines()[-1])
    print(summary)
    assert summary["checkpoints"] and summary["checkpoints"][-1] < STEPS, summary  # mid-run
    reference, drill_dir = tmp_path / "reference", tmp_path / "drill"
    resumed = (tmp_path / "resumed.0.log").read_text()
    assert f"resumed from {drill_dir / 'checkpoints'}/{summary['checkpoints'][-1]}" in resumed

    expected, got = _state(reference), _state(drill_dir)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert value.dtype == got[key].dtype and value.tobytes() == got[key].tobytes(), key
    for i in range(PROCESSES):
        data = f"checkpoints/{STEPS}/data/process_{i}-of-{PROCESSES}.json"
        assert (drill_dir / data).read_text() == (reference / data).read_text()
    rows = _rows(drill_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, STEPS + 1, 2))  # log_every 2
    assert rows == _rows(reference)  # each step once, with the same values (report included)


def test_cluster_flags_need_distributed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", EXPERIMENT, "--process_id", "1"])
    assert exit_info.value.code == 2
    assert "--process_id needs --distributed" in capsys.readouterr().err


if __name__ == "__main__":
    print(json.dumps(drill(Path(sys.argv[1]), sys.argv[2])))
