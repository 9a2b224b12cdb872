"""The training loop: exact resume after SIGTERM, metrics files, eval/report, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto.event_pb2 import Event
from train_toy import build_toy, toy_config, toy_iterator_factory, toy_records

from pretzel_jax.train import NonFiniteError, train

STEPS, BATCH = 12, 16
TRAIN_FIELDS = {
    "step",
    "loss",
    "bits_per_dim",
    "logdet",
    "grad_norm",
    "lr",
    "step_time_s",
    "examples_per_s",
    "skipped",
}


def _report(model, config, data, key, run_dir):
    (Path(run_dir) / "report.txt").write_text("ok")
    return {"eval_examples": sum(len(batch["x"]) for batch in data(config.data.eval_split))}


def _run(run_dir, *overrides, sigterm_at=None, records=None, report=_report, build=build_toy):
    return train(
        toy_config("train.eval_every=6", "train.eval_batches=2", *overrides),
        run_dir,
        make_iterator=toy_iterator_factory(records or toy_records(), sigterm_at=sigterm_at),
        build_model=build,
        report=report,
    )


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in _rows(run_dir) if "loss" in row}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, _run(run_dir)


def test_resume_after_sigterm_continues_the_loss_curve_exactly(uninterrupted, tmp_path):
    reference_dir, _ = uninterrupted
    # SIGTERM arrives while the 6th batch is read: step 6 completes, is saved, and train returns.
    first = _run(tmp_path, sigterm_at=5 * BATCH + 3)
    assert first["preempted"] and first["step"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 6]
    assert not (tmp_path / "report.txt").exists()  # no report for an unfinished run

    second = _run(tmp_path)
    assert not second["preempted"] and second["step"] == STEPS
    expected = _losses(reference_dir)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(tmp_path) == expected  # bit-exact: same data position, keys, params


def test_metrics_files(uninterrupted):
    run_dir, result = uninterrupted
    rows = _rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == STEPS
    for row in train_rows:
        assert set(row) >= TRAIN_FIELDS, TRAIN_FIELDS - set(row)
        assert row["skipped"] == 0 and row["examples_per_s"] > 0
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert rows[-1] == {"step": STEPS, "report/eval_examples": 192.0}
    assert result["report/eval_examples"] == 192.0 and result["loss"] == train_rows[-1]["loss"]
    assert (run_dir / "report.txt").read_text() == "ok"
    assert list((run_dir / "tensorboard").iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["steps"] == STEPS and config["run_dir"] == str(run_dir)
    assert "dense1/kernel" in (run_dir / "param_policy.txt").read_text()


def test_consecutive_nonfinite_steps_stop_training(tmp_path):
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss") as err:
        _run(tmp_path, "train.max_consecutive_nonfinite=3", records=toy_records(nan=True))
    assert "(steps 1-3; last: loss=nan" in str(err.value)
    assert "No checkpoint was saved: start over" in str(err.value)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def _tb_events(run_dir) -> list[list[Event]]:
    """The events of each TensorBoard file (TFRecord framing: length, crc, data, crc)."""
    files = []
    for path in sorted((Path(run_dir) / "tensorboard").iterdir()):
        data, events, offset = path.read_bytes(), [], 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
        files.append(events)
    return files


def test_a_nan_streak_leaves_no_poisoned_checkpoint_and_a_resume_logs_each_step_once(tmp_path):
    # Steps 1-5 finite, 6-9 non-finite (the limit): checkpoints due at 6 and 8 are postponed.
    nan_run = ("train.max_consecutive_nonfinite=4", "train.ckpt_every=2", "data.shuffle=False")
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteError) as err:
        _run(tmp_path, *nan_run, records=toy_records(nan_from=5 * BATCH))
    text = str(err.value)
    assert text.startswith("4 consecutive steps had a non-finite loss or gradient norm (steps 6-9;")
    assert "no checkpoint was saved during them" in text and "\n" not in text
    assert f"The newest checkpoint, {checkpoints}/4, holds the state before them: rerun" in text
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [2, 4]
    for step in (2, 4):
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(checkpoints / str(step) / "state")
        assert int(state["nonfinite_consecutive"]) == 0
        for leaf in jax.tree.leaves(state):
            assert np.all(np.isfinite(leaf))
    assert [r["step"] for r in _rows(tmp_path) if "loss" in r] == list(range(1, 9))

    # The advice: rerun (here with the data fixed) resumes from step 4 and logs 5-12 once.
    assert _run(tmp_path, *nan_run)["step"] == STEPS
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "eval/loss" in r] == [6, 12]
    assert all(r["loss"] is not None for r in rows if "loss" in r)
    first, resumed = _tb_events(tmp_path)  # two files, even when both start in one second
    assert max(e.step for e in first) == 8  # the first session's events are kept
    starts = [e.step for e in resumed if e.HasField("session_log")]
    assert starts == [5]  # TensorBoard purges the first file's events from step 5 on


def test_a_rerun_of_a_finished_run_redoes_the_report_once(uninterrupted, tmp_path):
    run_dir = Path(shutil.copytree(uninterrupted[0], tmp_path / "run"))
    before = _rows(run_dir)
    result = _run(run_dir)
    assert result["step"] == STEPS and not result["preempted"]
    assert _rows(run_dir) == before  # the report row replaced, not appended


def _sigterm_report(model, config, data, key, run_dir):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(200):
        time.sleep(0.05)  # the handler raises here
    raise AssertionError("the report went on after SIGTERM")


def test_sigterm_during_the_report_abandons_it_with_one_line(uninterrupted, tmp_path, caplog):
    run_dir = Path(shutil.copytree(uninterrupted[0], tmp_path / "run"))
    result = _run(run_dir, report=_sigterm_report)
    assert result["preempted"] and result["step"] == STEPS
    assert "SIGTERM during the end-of-run report: abandoning it" in caplog.text
    assert not [r for r in _rows(run_dir) if "report/eval_examples" in r]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert not _run(run_dir)["preempted"]  # the rerun redoes the report
    assert len([r for r in _rows(run_dir) if "report/eval_examples" in r]) == 1


def test_sigterm_during_setup_stops_before_the_first_step(tmp_path, caplog):
    sent = []

    def build(config, *, rngs):
        if not sent:  # once, while the model is traced
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return build_toy(config, rngs=rngs)

    result = _run(tmp_path, build=build)
    assert result["preempted"] and result["step"] == 0
    assert "SIGTERM during setup: stopping before the first step" in caplog.text
    assert not list((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "report.txt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
