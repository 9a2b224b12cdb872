"""Damaged checkpoints are refused in one line naming them, kept, and training falls back to the
newest one that passes; checkpoints of a different model or config are refused with the fix."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_toy import build_toy, toy_config, toy_iterator_factory, toy_records

from pretzel_jax.train import CheckpointError, checkpoint, train
from pretzel_jax.train.checkpoint import Checkpointer

STEPS = 8  # checkpoints at 4 and 8


def _train(run_dir, *overrides, build_model=build_toy):
    return train(
        toy_config(f"train.steps={STEPS}", *overrides),
        run_dir,
        make_iterator=toy_iterator_factory(toy_records()),
        build_model=build_model,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    _train(run_dir)
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _data_files(state_dir: Path) -> list[Path]:
    """The OCDBT data files of a state item (array bytes and b-tree nodes)."""
    return sorted(p for p in state_dir.rglob("*") if p.parent.name == "d" and p.is_file())


def _flip_bytes(state_dir: Path) -> None:
    """Invert 8 bytes in the middle of every array data file (sizes unchanged)."""
    for path in _data_files(state_dir):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        path.write_bytes(bytes(data))


def _truncate_arrays(state_dir: Path) -> None:
    for path in _data_files(state_dir):
        _truncate(path)


INF_LEAF = ".opt_state[1][0].mu['dense1']['kernel']"


def _inf_in_adam_moment(state_dir: Path) -> None:
    """Rewrite the state item with one Adam moment entry set to inf: array files that decode
    without error but hold other values (what a flipped bit inside a chunk gives)."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(state_dir)
    moment = np.array(state["opt_state"][1][0]["mu"]["dense1"]["kernel"])
    moment[0, 0] = np.inf
    state["opt_state"][1][0]["mu"]["dense1"]["kernel"] = moment
    shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(state_dir, state)


def _checksums(step_dir: Path) -> dict:
    return json.loads((step_dir / "config" / "metadata").read_text())["checksums"]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# Orbax's asyncio helpers may complain after a failed restore ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage, target, message",
    [
        (_flip_bytes, "state", "is corrupt or partial (ValueError: "),
        (_inf_in_adam_moment, "state", f"fails its checksum in array {INF_LEAF} (files under"),
        (_truncate_arrays, "state", "is corrupt or partial (ValueError: "),
        (_delete, "state/d", "is corrupt or partial"),
        (_truncate, "state/manifest.ocdbt", "is corrupt or partial"),
        (_delete, "data", "is incomplete (no ['data'])"),
        (_truncate, "config/metadata", "has unreadable metadata"),
    ],
    ids=[
        "flipped_bytes",
        "inf_in_adam_moment",
        "truncated_arrays",
        "deleted_arrays",
        "truncated_manifest",
        "missing_item",
        "truncated_config",
    ],
)
def test_a_damaged_checkpoint_is_refused_by_name_kept_and_training_falls_back(
    run_copy, finished_run, damage, target, message, caplog
):
    step_dir = run_copy / "checkpoints" / str(STEPS)
    damage(step_dir / target)
    damaged = _snapshot(step_dir)
    with caplog.at_level(logging.WARNING, logger="pretzel_jax"):
        assert _train(run_copy)["step"] == STEPS
    # Ours alone: asyncio may also log an Orbax read task of the damaged file that nobody awaited.
    ours = [r for r in caplog.records if r.name.startswith("pretzel_jax")]
    (warning,) = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    aside = run_copy / "refused_checkpoints" / str(STEPS)
    assert warning.startswith(f"checkpoint {step_dir} {message}"), warning
    assert warning.endswith(f"; moved it to {aside} and resumed from step 4"), warning
    assert "\n" not in warning and len(warning) < 600
    assert _snapshot(aside) == damaged  # kept byte for byte, never deleted
    # Steps 5-8 again from step 4: the same state, bit for bit, as before the damage.
    assert _checksums(step_dir) == _checksums(finished_run / "checkpoints" / str(STEPS))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_when_every_checkpoint_is_damaged_one_line_names_the_newest_and_nothing_moves(run_copy):
    checkpoints = run_copy / "checkpoints"
    for step in (4, STEPS):
        _flip_bytes(checkpoints / str(step) / "state")
    with pytest.raises(CheckpointError) as err:
        _train(run_copy)
    text = str(err.value)
    assert text.startswith(f"no checkpoint can be restored: checkpoint {checkpoints / '8'} is ")
    assert "(and 1 older ones). Pass a fresh --run_dir to start over" in text
    assert "\n" not in text and "tensorstore_spec" not in text
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "8"]
    assert not (run_copy / "refused_checkpoints").exists()


def test_the_checksums_cover_every_state_array(finished_run):
    step_dir = finished_run / "checkpoints" / str(STEPS)
    saved = _checksums(step_dir)
    signature = json.loads((step_dir / "config" / "metadata").read_text())["state_signature"]
    assert set(saved) == set(signature) and INF_LEAF in saved


@pytest.mark.parametrize(
    "overrides, build_model, changed",
    [
        ((), functools.partial(build_toy, hidden=32), "shape/dtype changed: .params['dense1']"),
        # Frozen parameters are not in the train state: they leave its params and opt_state.
        (("optim.freeze=dense1",), build_toy, "only in checkpoint: .params['dense1']"),
    ],
    ids=["wider_model", "new_freeze_policy"],
)
def test_resume_with_a_different_train_state_is_refused(run_copy, overrides, build_model, changed):
    with pytest.raises(CheckpointError, match="holds a different train state") as err:
        _train(run_copy, *overrides, build_model=build_model)
    assert str(run_copy / "checkpoints" / str(STEPS)) in str(err.value)
    assert changed in str(err.value)


def test_the_state_item_reads_back_with_orbax_standard_checkpointer(finished_run):
    # Other tools read the state with orbax's standard API; the per-array metadata is kept.
    path = finished_run / "checkpoints" / str(STEPS) / "state"
    assert (path / "array_metadatas").is_dir()
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path)
    assert int(restored["step"]) == STEPS and "dense1" in restored["params"]


def test_a_state_holding_a_nan_is_never_saved(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    state = {"ok": jnp.ones(3), "moment": jnp.array([1.0, jnp.nan])}
    assert not checkpointer.save(1, state, None, toy_config())
    checkpointer.close()
    assert "step 1 not checkpointed: non-finite values in ['moment']" in caplog.text
    assert checkpointer.latest_step() is None and not list(tmp_path.iterdir())


def test_closed_event_loop_tracebacks_of_a_failed_restore_are_dropped(monkeypatch):
    # Outside pytest a failed restore printed ~20 of them around its one-line warning.
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._drop_closed_loop_noise()
    checkpoint._drop_closed_loop_noise()  # installed once
    noise = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(noise)
    sys.unraisablehook(other)
    assert seen == [other]
