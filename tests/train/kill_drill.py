"""SIGKILL drill, run as a script by test_train_kill.py.

python tests/train/kill_drill.py ROOT KILLS SEED: trains the toy run in ROOT/reference without
interruption, then in ROOT/drill, killing the training process with SIGKILL KILLS times and
restarting it, then lets it finish. The kills rotate over three kinds of moment: a random time
within a start's setup (restore, compile), 0-20 ms after the 1st-4th batch is placed, and 0-30 ms
after the 1st-2nd checkpoint save begins. The child reports batches and saves through a pipe, so
the moments (and the progress between kills) do not depend on the machine's speed. Prints one
JSON line: {"killed": n, "in_save": n, "attempts": [...]}.

One parent imports everything once and forks a child per attempt: a restart then costs the
child's setup, not the imports. The parent never starts JAX's backend, so forking is safe.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import absl.flags  # noqa: E402

absl.flags.FLAGS.mark_as_parsed()

from train_toy import build_toy, toy_config, toy_iterator_factory, toy_records  # noqa: E402

import pretzel_jax.models  # noqa: E402, F401  (imported before forking, once)
from pretzel_jax.train import loop, train  # noqa: E402
from pretzel_jax.train.checkpoint import Checkpointer  # noqa: E402

STEPS = 48  # about 1.3 steps of progress per kill: 20 kills end near step 25
OVERRIDES = (
    f"train.steps={STEPS}",
    "train.ckpt_every=2",
    "train.keep_checkpoints=2",
    "train.eval_every=16",
    "train.eval_batches=1",
)


def _report(model, config, data, key, run_dir):
    return {"eval_examples": sum(len(batch["x"]) for batch in data(config.data.eval_split))}


def _child(run_dir: Path, pipe: int) -> None:
    """Train (resuming) in `run_dir`; write "batch" / "save" lines to `pipe` as they begin."""
    save, place = Checkpointer.save, loop.shard_batch

    def reporting_save(self, *args, **kwargs):
        os.write(pipe, b"save\n")
        return save(self, *args, **kwargs)

    def reporting_place(*args, **kwargs):
        os.write(pipe, b"batch\n")
        return place(*args, **kwargs)

    Checkpointer.save, loop.shard_batch = reporting_save, reporting_place
    try:
        train(
            toy_config(*OVERRIDES),
            run_dir,
            make_iterator=toy_iterator_factory(toy_records()),
            build_model=build_toy,
            report=_report,
        )
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _attempt(run_dir: Path, kind: str | None = None, at: float = 0.0) -> dict:
    """Fork one training child and SIGKILL it: `at` s after the start (kind "time"), or just
    after its `at`-th "batch" / "save" event; kind None lets it finish. Returns what happened."""
    checkpoints = run_dir / "checkpoints"
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    read, write = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _child(run_dir, write)
    os.close(write)
    events = {"batch": 0, "save": 0}
    first_batch, buffer = None, b""
    deadline = start + at if kind == "time" else None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:  # the deadline passed
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read, 4096)
        if not chunk:  # the child exited on its own
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            events[line.decode()] += 1
        if events["batch"] and first_batch is None:
            first_batch = time.monotonic() - start
        if kind in events and events[kind] >= at and deadline is None:
            jitter = 0.03 if kind == "save" else 0.02
            deadline = time.monotonic() + random.uniform(0.0, jitter)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if not killed and os.WEXITSTATUS(status) != 0:
        raise SystemExit(f"a training child failed (exit {os.WEXITSTATUS(status)})")
    return {
        "kind": kind,
        "at": at,
        "from_step": max(steps, default=0),
        "killed": killed,
        "in_save": killed and kind == "save" and events["save"] >= at,
        "after_s": round(time.monotonic() - start, 3),
        "first_batch_s": first_batch,
        **events,
    }


def main(root: Path, kills: int, seed: int) -> None:
    random.seed(seed)
    setup = _attempt(root / "reference")["first_batch_s"]
    attempts = []
    for i in range(kills):
        kind = ("time", "batch", "save")[i % 3]
        at = {"time": random.uniform(0.0, setup), "batch": random.randint(1, 8)}.get(
            kind, random.randint(1, 4)
        )
        attempts.append(_attempt(root / "drill", kind, at))
    _attempt(root / "drill")
    summary = {
        "killed": sum(a["killed"] for a in attempts),
        "in_save": sum(a["in_save"] for a in attempts),
        "attempts": attempts,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
