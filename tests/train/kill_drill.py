"""SIGKILL drill, run as a script by test_train_kill.py.

python tests/train/kill_drill.py ROOT KILLS SEED: trains the toy run in ROOT/reference without
interruption, then in ROOT/drill, killing the training process with SIGKILL KILLS times and
restarting it, then lets it finish. Half the kills come at a random moment after the start, half
0-30 ms after a checkpoint save begins (the save reports itself through a pipe). Prints one JSON
line: {"killed": n, "in_save": n, "attempts": [...]}.

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
from pretzel_jax.train import train  # noqa: E402
from pretzel_jax.train.checkpoint import Checkpointer  # noqa: E402

STEPS = 48
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
    """Train (resuming) in `run_dir`; write each checkpoint save's step to `pipe`."""
    save = Checkpointer.save

    def reporting_save(self, step, *args, **kwargs):
        os.write(pipe, f"{step}\n".encode())
        return save(self, step, *args, **kwargs)

    Checkpointer.save = reporting_save
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


def _attempt(run_dir: Path, kill_after: float | None, kill_at_save: int | None) -> dict:
    """Fork one training child; SIGKILL it `kill_after` s after the start or 0-30 ms after its
    `kill_at_save`-th save begins (neither: let it finish). Returns what happened."""
    read, write = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _child(run_dir, write)
    os.close(write)
    saves: list[int] = []
    first_save = None
    buffer = b""
    deadline = None if kill_after is None else start + kill_after
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
        saves += [int(line) for line in lines]
        if saves and first_save is None:
            first_save = time.monotonic() - start
        if kill_at_save is not None and len(saves) >= kill_at_save and deadline is None:
            deadline = time.monotonic() + random.uniform(0.0, 0.03)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if not killed and os.WEXITSTATUS(status) != 0:
        raise SystemExit(f"a training child failed (exit {os.WEXITSTATUS(status)})")
    return {
        "killed": killed,
        "in_save": killed and kill_at_save is not None and len(saves) >= kill_at_save,
        "after_s": round(time.monotonic() - start, 3),
        "first_save_s": first_save,
        "saves_begun": saves,
    }


def main(root: Path, kills: int, seed: int) -> None:
    random.seed(seed)
    # Random kills fall in the first 1.5x the time a start takes to its first save (setup,
    # restore, compile, the first steps); each save kill lets 0-2 saves complete first.
    setup = _attempt(root / "reference", None, None)["first_save_s"]
    attempts = []
    for i in range(kills):
        if i % 2:
            attempts.append(_attempt(root / "drill", None, random.randint(1, 3)))
        else:
            attempts.append(_attempt(root / "drill", random.uniform(0.0, 1.5 * setup), None))
    _attempt(root / "drill", None, None)
    summary = {
        "killed": sum(a["killed"] for a in attempts),
        "in_save": sum(a["in_save"] for a in attempts),
        "attempts": attempts,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
