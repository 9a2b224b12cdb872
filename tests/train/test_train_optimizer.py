"""Parameter policy (freeze / weight-decay regexes) and the LR schedule."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from train_toy import build_toy, toy_batch, toy_config

from pretzel_jax.train.config import ConfigError
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.optimizer import describe_param_policy, make_schedule
from pretzel_jax.train.state import build_setup, init_rest, init_state
from pretzel_jax.train.step import make_train_step, shard_batch


def test_frozen_params_are_bit_identical_and_have_no_moments():
    config = toy_config("optim.freeze=dense1")
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    state, rest = init_state(setup), init_rest(setup)
    initial = jax.device_get((state.params, rest.frozen))
    step = make_train_step(setup)
    for i in range(3):
        state, _ = step(state, shard_batch(toy_batch(seed=i), setup.mesh, setup.rules), rest)
    final = jax.device_get((state.params, rest.frozen))

    # Frozen params live in `rest` (not in the train state) and the step cannot change them.
    assert "dense1" not in state.params and set(rest.frozen) == {"dense1"}
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(final[1]["dense1"][name], initial[1]["dense1"][name])
    assert not np.array_equal(final[0]["dense2"]["kernel"], initial[0]["dense2"]["kernel"])
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    opt_paths = [p for p in opt_paths if p.startswith(".opt_state")]
    assert opt_paths and not any("dense1" in p for p in opt_paths)
    assert any("dense2" in p for p in opt_paths)


def test_policy_table_and_decay_mask():
    config = toy_config("optim.freeze=dense1/bias")
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    assert setup.policy.trainable == {"dense1/kernel", "dense2/kernel", "dense2/bias", "scale"}
    assert setup.policy.decay == {"dense1/kernel", "dense2/kernel"}  # no bias, no scale
    table = describe_param_policy(setup.all_params, config.optim)
    rows = {line.split()[0]: line.split()[-2:] for line in table.splitlines()[2:-1]}
    assert rows["dense1/bias"] == ["no", "no"]
    assert rows["dense1/kernel"] == ["yes", "yes"]
    assert rows["scale"] == ["yes", "no"]
    assert "frozen params: 16" in table


@pytest.mark.parametrize("key", ["freeze", "no_decay"])
def test_a_pattern_matching_no_parameter_is_an_error(key):
    config = toy_config(f"optim.{key}=dense1,dense3")
    with pytest.raises(ConfigError, match=rf"optim.{key} pattern 'dense3' matches no parameter"):
        build_setup(config, make_mesh(config.mesh), build_toy)


def test_freezing_everything_is_an_error():
    config = toy_config("optim.freeze=.*")
    with pytest.raises(ConfigError, match="freezes every parameter"):
        build_setup(config, make_mesh(config.mesh), build_toy)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    optim = toy_config(f"optim.schedule={schedule}", "optim.min_lr=0.001").optim
    lr = make_schedule(optim, steps=12)
    np.testing.assert_allclose(float(lr(0)), 0.001, rtol=1e-6)
    np.testing.assert_allclose(float(lr(2)), 0.01, rtol=1e-6)  # end of warm-up: peak lr
    np.testing.assert_allclose(float(lr(12)), 0.001 if schedule == "cosine" else 0.01, rtol=1e-5)
