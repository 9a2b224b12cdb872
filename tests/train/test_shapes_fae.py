"""experiments/shapes_fae.py at its `:test` size through the train loop: the loss falls, a resume
from a mid-run checkpoint continues exactly, and the report exports the FAE weights; the adapt
phase (also of the paper-scale config) runs in a folder of its own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pretzel_jax.data import prepare_dataset
from pretzel_jax.fae import weights
from pretzel_jax.train.config import load_config
from pretzel_jax.train.loop import train

EXPERIMENT = "experiments/shapes_fae.py:test"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    prepare_dataset("shapes_images_tiny", str(path))
    return str(path)


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_shapes_fae_trains_resumes_exactly_and_exports(data_dir, tmp_path):
    config = load_config(
        EXPERIMENT, overrides=[f"data.data_dir={data_dir}", "model.fae.report.images=0"]
    )
    run = tmp_path / "run"
    result = train(config, run)
    assert result["step"] == config.train.steps == 4
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]
    exported = weights.read(run / "fae.safetensors")
    assert np.all(exported["latent_norm/std"] > 0)
    assert not np.allclose(exported["latent_norm/std"], 1.0)  # statistics were computed

    # Resume from the step-2 checkpoint in a copy of the run: steps 3-4 and the final weights
    # must be the same bit for bit (same data position, keys, optimizer state).
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    (resumed / "metrics.jsonl").write_text("")
    (resumed / "fae.safetensors").unlink()
    assert train(config, resumed)["step"] == 4
    again = _losses(resumed)
    assert sorted(again) == [3, 4]
    assert again == {k: losses[k] for k in (3, 4)}
    final = weights.read(resumed / "fae.safetensors")
    for k, v in exported.items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)


@pytest.mark.parametrize("experiment", ["experiments/shapes_fae.py", "experiments/fae_dinov2g.py"])
def test_adapt_phase_runs_in_its_own_folder(experiment):
    # The CLI's default folder is runs/<experiment>: the adapt phase there would find the
    # feature phase's checkpoints and resume them.
    feature, adapt = load_config(experiment), load_config(experiment + ":adapt")
    assert feature.run_dir == "" and adapt.run_dir.endswith("_adapt")
    assert adapt.model.fae.init_from.startswith(adapt.run_dir.removesuffix("_adapt") + "/")
