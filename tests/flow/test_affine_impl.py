"""`FlowConfig.affine_impl="pallas"`: the fused kernels inside the flow equal the XLA path, in
the block, under CFG sampling, and inside the sharded train step (shard_map over the batch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from randomize import randomized

from pretzel_jax import models
from pretzel_jax.flow import DeepShallowFlow, FlowConfig, nll_per_dim
from pretzel_jax.train.config import load_config
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.state import build_setup, init_rest, init_state
from pretzel_jax.train.step import make_train_step, shard_batch

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "digits_flow.py"


def _pair(**kw):
    cfg = FlowConfig(token_dim=3, width=32, head_dim=16, layers_per_block=(1, 1), **kw)
    xla = randomized(DeepShallowFlow(cfg, rngs=nnx.Rngs(0)), 0)
    graphdef, state = nnx.split(xla)
    pallas_cfg = dataclasses.replace(cfg, affine_impl="pallas")
    pallas = nnx.merge(nnx.graphdef(DeepShallowFlow(pallas_cfg, rngs=nnx.Rngs(0))), state)
    del graphdef
    return xla, pallas


@pytest.mark.parametrize("use_sos", [True, False], ids=["sos", "shift"])
def test_forward_and_gradients_match_xla(use_sos):
    xla, pallas = _pair(use_sos=use_sos, context_dim=5)
    x = jax.random.normal(jax.random.key(1), (2, 11, 3))
    ctx = jax.random.normal(jax.random.key(2), (2, 4, 5))

    def loss(model):
        z, logdet = model.forward(x, ctx)
        return nll_per_dim(z, logdet).mean(), (z, logdet)

    loss_and_grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (l_x, (z_x, ld_x)), g_x = loss_and_grads(xla)
    (l_p, (z_p, ld_p)), g_p = loss_and_grads(pallas)
    np.testing.assert_allclose(z_p, z_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ld_p, ld_x, rtol=1e-5)
    np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_x), nnx.to_flat_state(g_p), strict=True):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert np.abs(b - a).max() <= 1e-4 * max(np.abs(a).max(), 1e-6), path


def test_guided_sampling_matches_xla():
    xla, pallas = _pair(context_dim=5)
    z = jax.random.normal(jax.random.key(3), (2, 9, 3))
    ctx = jax.random.normal(jax.random.key(4), (2, 4, 5))
    kw = dict(guidance=2.0, uncond_context=jnp.zeros_like(ctx))
    np.testing.assert_allclose(
        pallas.inverse(z, ctx, **kw), xla.inverse(z, ctx, **kw), rtol=1e-5, atol=1e-5
    )


def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in a jaxpr, nested ones (jit, scan, shard_map, vjp) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


def _digits_step(affine_impl: str, batches):
    # A shallow and a deep block (the digits flow has two shallow ones): a third less to compile.
    overrides = ["mesh.data=2", "mesh.fsdp=4", f"model.flow.affine_impl={affine_impl}"]
    overrides.append("model.flow.layers_per_block=(1, 1)")
    config = load_config(EXPERIMENT, "test", overrides)
    setup = build_setup(config, make_mesh(config.mesh), models.build)
    state, rest = init_state(setup), init_rest(setup)
    step = make_train_step(setup)
    for batch in batches:
        sharded = shard_batch(batch, setup.mesh, setup.rules)
        jaxpr = _primitives(jax.make_jaxpr(step)(state, sharded, rest).jaxpr)
        state, metrics = step(state, sharded, rest)
    return state, metrics, jaxpr


def test_sharded_train_step_with_the_kernel():
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 17, (16, 8, 8, 1)).astype(np.int32),
            "label": rng.integers(0, 10, (16,)).astype(np.int32),
        }
        for _ in range(1)
    ]
    ref_state, ref_metrics, ref_jaxpr = _digits_step("xla", batches)
    state, metrics, jaxpr = _digits_step("pallas", batches)
    assert "pallas_call" in jaxpr and "shard_map" in jaxpr
    assert "pallas_call" not in ref_jaxpr
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(ref_state.params))
    for (path, a), b in zip(flat, jax.tree.leaves(jax.device_get(state.params)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
