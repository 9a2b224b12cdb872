"""The training loop: exact resume after SIGTERM, metrics files, eval/report, NaN stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
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


def _run(run_dir, *overrides, sigterm_at=None, records=None):
    return train(
        toy_config("train.eval_every=6", "train.eval_batches=2", *overrides),
        run_dir,
        make_iterator=toy_iterator_factory(records or toy_records(), sigterm_at=sigterm_at),
        build_model=build_toy,
        report=_report,
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
    assert "up to step 3" in str(err.value)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
