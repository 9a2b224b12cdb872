"""Config: defaults, experiment files, overrides, and one clear ConfigError per bad config."""

from __future__ import annotations

import json

import pytest

from pretzel_jax.train.__main__ import main
from pretzel_jax.train.config import (
    ConfigError,
    default_config,
    load_config,
    saved_config,
    validate,
)

EXPERIMENT = """
from pretzel_jax.train.config import default_config


def get_config(arg=None):
    config = default_config()
    config.train.steps = 50 if arg is None else int(arg)
    config.optim.warmup_steps = 5
    {extra}
    return config
"""


@pytest.fixture
def experiment(tmp_path):
    def write(extra: str = "") -> str:
        path = tmp_path / "exp.py"
        path.write_text(EXPERIMENT.format(extra=extra))
        return str(path)

    return write


def test_default_config_is_valid_and_locked():
    config = default_config()
    validate(config, device_count=8, process_count=1)
    with pytest.raises(AttributeError, match="stepz"):
        config.train.stepz = 3


def test_experiment_file_arg_and_overrides(experiment):
    path = experiment()
    assert load_config(path).train.steps == 50
    assert load_config(f"{path}:70").train.steps == 70
    config = load_config(
        path,
        overrides=[
            "train.steps=100",
            "optim.lr=3e-4",
            "train.async_checkpoint=false",
            "optim.freeze=vlm/.*,fae/.*",
            "optim.no_decay=['bias']",
            "data.name=digits",
        ],
    )
    assert config.train.steps == 100 and config.optim.lr == 3e-4
    assert config.train.async_checkpoint is False
    assert tuple(config.optim.freeze) == ("vlm/.*", "fae/.*")
    assert tuple(config.optim.no_decay) == ("bias",)
    assert config.data.name == "digits"


def test_unknown_override_key_names_the_key_and_the_fix(experiment):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'; did you mean "):
        load_config(experiment(), overrides=["train.stepz=3"])


def test_typo_in_experiment_file_names_the_file_and_the_key(experiment):
    path = experiment("config.train.stepz = 3")
    with pytest.raises(ConfigError, match="exp.py.*stepz") as err:
        load_config(path)
    assert 'Did you mean "steps"' in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.batch_size=12"], "data.batch_size=12 must be a positive multiple of the batch"),
        (["mesh.data=3"], "mesh.data * mesh.fsdp * mesh.tensor = 3 but there are 8 devices"),
        (["mesh.fsdp=-1"], "mesh.data and mesh.fsdp are both -1"),
        (["optim.warmup_steps=60"], "optim.warmup_steps=60 must be in [0, 49]"),
        (["optim.schedule=linear"], "optim.schedule='linear' is unknown"),
        (["optim.freeze=("], "optim.freeze pattern '(' is not a valid regex"),
        (["optim.min_lr=1.0"], "optim.min_lr=1.0 must be in [0, optim.lr="),
        (["train.progress_bar=maybe"], "train.progress_bar='maybe'"),
        (["train.steps=abc"], "train.steps='abc': expected an integer"),
        (["optim.lr=fast"], "optim.lr='fast': expected a number"),
        (["train=3"], "train is a config section"),
        (
            ["data.name=digitz"],
            "data.name='digitz' is not a known data set; did you mean 'digits'?",
        ),
    ],
)
def test_impossible_settings_raise_one_config_error(experiment, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(experiment(), overrides=overrides)
    assert message in str(err.value)


def test_all_problems_are_reported_together(experiment):
    with pytest.raises(ConfigError) as err:
        load_config(experiment(), overrides=["data.batch_size=12", "optim.schedule=linear"])
    assert "data.batch_size" in str(err.value) and "optim.schedule" in str(err.value)


def test_config_not_built_from_defaults_lists_missing_sections(tmp_path):
    path = tmp_path / "bare.py"
    path.write_text(
        "import ml_collections\n\ndef get_config():\n    return "
        "ml_collections.ConfigDict({'seed': 0, 'trian': {}})\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    text = str(err.value)
    assert "unknown config key 'trian'; did you mean train?" in text
    assert "optim is missing" in text


def test_cli_reports_a_bad_key_as_one_line(experiment, capsys):
    path = experiment()
    assert main(["--config", path, "--config.train.stepz", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'train.stepz'") and "\n" not in err


def test_a_saved_config_of_an_older_version_gets_the_new_keys_at_their_defaults():
    values = json.loads(default_config().to_json_best_effort())
    del values["train"]["microbatches"], values["mesh"]["replicated_limit_mib"]
    config = saved_config(values)
    assert config.train.microbatches == 1 and config.mesh.replicated_limit_mib == 16.0
    validate(config, device_count=8, process_count=1)
    values["train"]["microbatchez"] = 2
    with pytest.raises(ConfigError, match="train.microbatchez"):
        validate(saved_config(values), device_count=8, process_count=1)
