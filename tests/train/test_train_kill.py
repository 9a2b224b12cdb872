"""SIGKILL at random moments (a third inside checkpoint saves), restart, repeat: the run ends in
the same state, bit for bit, as an uninterrupted one, and metrics.jsonl holds each step once.

The drill (kill_drill.py) runs in its own process. Each kill costs about 1 s on 2 cores (a
restart's setup): with KILLS = 20 the test takes about 30 s.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from kill_drill import STEPS

KILLS = 20
DRILL = Path(__file__).with_name("kill_drill.py")
TIMING = {"step_time_s", "examples_per_s"}  # wall-clock fields differ between runs


def _state(run_dir: Path) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(run_dir / "checkpoints" / str(STEPS) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state)}


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_state_bit_for_bit(tmp_path):
    seed = random.randrange(2**31)
    # Every program compiled by the reference run is cached, so restarts load them.
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    done = subprocess.run(
        [sys.executable, str(DRILL), str(tmp_path), str(KILLS), str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, f"seed {seed}: {done.stderr[-3000:]}"
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["killed"] == KILLS, (seed, summary)
    assert summary["in_save"] >= KILLS // 4, (seed, summary)  # save kills that came in time
    assert max(a["from_step"] for a in summary["attempts"]) >= 4, (seed, summary)  # progress

    reference, drill = tmp_path / "reference", tmp_path / "drill"
    expected, got = _state(reference), _state(drill)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert value.dtype == got[key].dtype and value.tobytes() == got[key].tobytes(), (seed, key)
    data = f"checkpoints/{STEPS}/data/process_0-of-1.json"
    assert (drill / data).read_text() == (reference / data).read_text(), seed

    rows = _rows(drill)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1)), seed
    assert rows == _rows(reference), seed  # each step once, with the same values
    assert not (drill / "refused_checkpoints").exists(), seed  # no kill left a damaged one
