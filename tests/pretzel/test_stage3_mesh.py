"""The stage-3 train step on a 2x2x2 fake-device mesh equals the single-device step (its own
file, so that xdist runs it beside the long stage chain of `test_stages.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pretzel_jax import models
from pretzel_jax.data import make_stage_iterator
from pretzel_jax.train.config import load_config


def test_stage3_step_on_a_2x2x2_mesh_equals_one_device(files):
    from pretzel_jax.train.mesh import make_mesh
    from pretzel_jax.train.state import build_setup, init_rest, init_state
    from pretzel_jax.train.step import make_train_step, shard_batch

    overrides = [
        f"data.data_dir={files / 'data'}",
        f"model.pretzel.vlm_path={files / 'hf'}",
        f"model.pretzel.fae_path={files / 'fae.safetensors'}",
        f"model.fae.encoder.path={files / 'hf'}",
        "model.pretzel.init_from=",
    ]
    results = []
    for mesh_cfg, devices in (
        ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()),
        ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
    ):
        config = load_config("experiments/shapes_stage3.py:test", overrides=overrides)
        config.unlock()
        config.mesh.update(mesh_cfg)
        mesh = make_mesh(config.mesh, devices)
        setup = build_setup(config, mesh, models.build)
        state, rest = init_state(setup), init_rest(setup)
        batch = next(make_stage_iterator(config.data, "train"))
        step = make_train_step(setup)
        state, metrics = step(state, shard_batch(batch, mesh, setup.rules), rest)
        results.append(jax.device_get((state.params, metrics)))
    (p8, m8), (p1, m1) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert jnp.isfinite(m8["loss"])
