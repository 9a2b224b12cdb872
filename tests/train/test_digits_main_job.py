"""The README's main job at its smoke size, end to end, and the CLI's one-line errors."""

import json
import math

import pytest

from pretzel_jax.data import prepare_dataset
from pretzel_jax.train.__main__ import main
from pretzel_jax.train.config import load_config
from pretzel_jax.train.loop import train

EXPERIMENT = "experiments/digits_flow.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    prepare_dataset("digits", str(path))
    return str(path)


@pytest.mark.slow
def test_digits_flow_trains_checkpoints_and_reports(data_dir, tmp_path):
    config = load_config(EXPERIMENT + ":test", overrides=[f"data.data_dir={data_dir}"])
    result = train(config, tmp_path)
    assert result["step"] == config.train.steps
    report = json.loads((tmp_path / "report.json").read_text())
    for key in (
        "heldout_bits_per_dim",
        "baseline_gaussian_bits_per_dim",
        "improvement_vs_gaussian",
    ):
        assert math.isfinite(report[key]), key
    assert report["heldout_examples"] == config.model.report.bpd_examples == 40
    assert (tmp_path / "samples_cfg1.png").stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "bits_per_dim", "logdet", "grad_norm", "step_time_s", "examples_per_s"} <= set(
        rows[0]
    )


def test_cli_missing_data_dir_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(
        [
            "--config",
            EXPERIMENT + ":test",
            f"--config.data.data_dir={missing}",
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert str(missing) in errors[0] and "pretzel_jax.data.prepare" in errors[0]


def test_cli_bad_config_key_names_the_key(tmp_path, capsys):
    code = main(
        ["--config", EXPERIMENT + ":test", "--config.train.stepz=3", "--run_dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "train.stepz" in err


def test_cli_negative_bpd_examples_fails_before_training(tmp_path, capsys):
    run = ["--config", EXPERIMENT + ":test", "--config.model.report.bpd_examples=-1"]
    assert main(run + ["--run_dir", str(tmp_path)]) == 1
    assert "model.report.bpd_examples=-1" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
