"""The sharded train step: equal to the single-device step, params sharded, NaN/Inf guard."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from train_toy import build_toy, toy_batch, toy_config

from pretzel_jax.train.config import validate
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.state import build_setup, init_rest, init_state
from pretzel_jax.train.step import make_train_step, shard_batch


def _train(config, mesh, batches):
    setup = build_setup(config, mesh, build_toy)
    state, rest = init_state(setup), init_rest(setup)
    step = make_train_step(setup)
    for batch in batches:
        state, metrics = step(state, shard_batch(batch, mesh, setup.rules), rest)
    return setup, state, metrics


@pytest.mark.parametrize("sizes", [(2, 4, 1), (2, 1, 4)], ids=["data2_fsdp4", "data2_tensor4"])
def test_sharded_step_matches_single_device(sizes):
    data, fsdp, tensor = sizes
    config = toy_config(f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    batches = [toy_batch(seed=i) for i in range(3)]
    one_device = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    _, single, _ = _train(config, one_device, batches)
    setup, sharded, _ = _train(config, make_mesh(config.mesh), batches)

    assert len(jax.devices()) == 8 and setup.mesh.devices.size == 8
    kernel = sharded.params["dense1"]["kernel"]  # logical ("embed", "mlp")
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.sharding.shard_shape(kernel.shape) == (8 // fsdp, 16 // tensor)
    adam = sharded.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    assert adam.mu["dense1"]["kernel"].sharding == kernel.sharding
    batch = shard_batch(batches[0], setup.mesh, setup.rules)["x"]
    assert batch.sharding.spec == P(("data", "fsdp"), None)

    flat_single = jax.tree_util.tree_leaves_with_path(jax.device_get(single))
    flat_sharded = jax.tree.leaves(jax.device_get(sharded))
    assert int(sharded.step) == 3
    for (path, a), b in zip(flat_single, flat_sharded, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_nonfinite_steps_are_skipped_and_counted():
    config = toy_config()
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    state, rest = init_state(setup), init_rest(setup)
    step = make_train_step(setup)
    good = shard_batch(toy_batch(), setup.mesh, setup.rules)
    bad_rows = toy_batch()
    bad_rows["x"][3, 2] = np.nan
    bad = shard_batch(bad_rows, setup.mesh, setup.rules)

    before = jax.device_get((state.params, state.opt_state))
    for i in (1, 2):
        state, metrics = step(state, bad, rest)
        assert float(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
        assert int(state.nonfinite_consecutive) == i and int(state.nonfinite_total) == i
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 2  # the batches were consumed

    state, metrics = step(state, good, rest)
    assert float(metrics["skipped"]) == 0
    assert int(state.nonfinite_consecutive) == 0 and int(state.nonfinite_total) == 2
    # The schedule only advances on applied updates: this was the first one.
    np.testing.assert_allclose(float(metrics["lr"]), float(setup.schedule(0)), rtol=1e-6)
    assert not np.array_equal(
        jax.device_get(state.params["dense1"]["kernel"]), before[0]["dense1"]["kernel"]
    )


def test_microbatches_average_the_gradients_of_their_slices():
    """train.microbatches=2: one step equals the optimizer applied to the mean of the two slices'
    gradients (slice i = rows i, i + 2, ..., its key fold_in(step key, i))."""
    config = toy_config("train.microbatches=2")
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    state, rest = init_state(setup), init_rest(setup)
    batch = toy_batch()
    before = jax.device_get(state)
    sharded = shard_batch(batch, setup.mesh, setup.rules)
    after, metrics = make_train_step(setup)(state, sharded, rest)

    model = build_toy(config, rngs=nnx.Rngs(config.seed))
    graphdef, _ = nnx.split(model)
    key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), 0)

    def loss(params, rows, key):
        return nnx.merge(graphdef, params).loss(rows, key)[0]

    slices = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    parts = [
        jax.value_and_grad(loss)(before.params, s, jax.random.fold_in(key, i))
        for i, s in enumerate(slices)
    ]
    grads = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
    updates, _ = setup.tx.update(grads, before.opt_state, before.params)
    expected = optax.apply_updates(before.params, updates)
    np.testing.assert_allclose(float(metrics["loss"]), (parts[0][0] + parts[1][0]) / 2, rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(expected):
        b = jax.tree_util.tree_leaves_with_path(jax.device_get(after.params))
        np.testing.assert_allclose(dict(b)[path], a, rtol=1e-5, atol=1e-7)


def test_microbatches_must_divide_the_batch_shards():
    with pytest.raises(ConfigError, match="train.microbatches=3"):
        validate(toy_config("train.microbatches=3"))


def test_a_large_parameter_the_mesh_cannot_shard_is_an_error():
    """mlp=6 does not divide tensor=4: dense1/dense2 would be replicated on that dim."""
    config = toy_config("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4")

    def build(config, *, rngs):
        return build_toy(config, rngs=rngs, hidden=6)

    build_setup(config, make_mesh(config.mesh), build)  # 192-byte kernels: under the limit
    config.mesh.replicated_limit_mib = 0.0
    with pytest.raises(
        ConfigError, match=r"3 parameter.*dense1/kernel \(8, 6\).*mlp.*replicated_limit_mib"
    ):
        build_setup(config, make_mesh(config.mesh), build)
    assert build_setup(toy_config("mesh.replicated_limit_mib=0"), make_mesh(config.mesh), build_toy)
