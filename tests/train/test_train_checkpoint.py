"""Checkpoint failures give one clear error naming the step directory and the fix."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
from train_toy import build_toy, toy_config, toy_iterator_factory, toy_records

from pretzel_jax.train import CheckpointError, train

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


# Orbax's asyncio helpers may complain after a failed restore ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage, target, message",
    [
        (_delete, "state/d", "is corrupt or partial"),
        (_truncate, "state/manifest.ocdbt", "is corrupt or partial"),
        (_delete, "data", "is incomplete (no ['data'])"),
        (_truncate, "config/metadata", "has unreadable metadata"),
    ],
    ids=["deleted_arrays", "truncated_manifest", "missing_item", "truncated_config"],
)
def test_corrupt_checkpoint_names_the_step_dir_and_the_fix(run_copy, damage, target, message):
    step_dir = run_copy / "checkpoints" / str(STEPS)
    damage(step_dir / target)
    with pytest.raises(CheckpointError) as err:
        _train(run_copy)
    text = str(err.value)
    assert text.startswith(f"checkpoint {step_dir} {message}"), text
    assert f"delete {step_dir} to resume from the previous checkpoint" in text

    shutil.rmtree(step_dir)  # the advised fix: resume from step 4 instead
    assert _train(run_copy)["step"] == STEPS


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
