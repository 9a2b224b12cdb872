"""Block-Jacobi sampling (pretzel_jax.flow.jacobi) against the sequential decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from randomize import randomized

from pretzel_jax.flow import DeepShallowFlow, FlowConfig, jacobi_flow_inverse, jacobi_inverse
from pretzel_jax.flow.jacobi import relative_change

N, CHUNK, LC = 11, 4, 4  # 11 tokens: chunks of 4, 4 and a short tail (3 with SOS, 2 without)


def make_flow(seed=0, std=0.1, **kw):
    base = dict(token_dim=3, width=32, head_dim=16, layers_per_block=(1, 1, 2), context_dim=5)
    flow = DeepShallowFlow(FlowConfig(**(base | kw)), rngs=nnx.Rngs(seed))
    return randomized(flow, seed + 1, std)


def _data(b=2, n=N):
    ks = jax.random.split(jax.random.key(7), 3)
    z = jax.random.normal(ks[0], (b, n, 3))
    ctx = jax.random.normal(ks[1], (b, LC, 5))
    uncond = jax.random.normal(ks[2], (b, LC, 5))
    mask = jnp.array([[True, True, True, False]] + [[True] * LC] * (b - 1))
    return z, ctx, mask, uncond


def _max_diff(a, b):
    return float(jnp.abs(a - b).max())


@pytest.mark.parametrize("permutation", ["identity", "flip"])
@pytest.mark.parametrize("use_sos", [True, False])
def test_guided_deep_block_with_tol_zero_equals_sequential_inverse(use_sos, permutation):
    flow = make_flow(use_sos=use_sos, permutations=("identity", "flip", permutation))
    block = flow.deep
    z, ctx, mask, uncond = _data()
    traces = []

    @jax.jit
    def jacobi(z, tol, w):
        traces.append(1)
        return jacobi_inverse(
            block, z, ctx, mask, chunk=CHUNK, tol=tol, max_iters=CHUNK, guidance=w,
            uncond_context=uncond, guidance_rule="product",
        )  # fmt: skip

    seq = jax.jit(lambda z, w: block.inverse(z, ctx, mask, guidance=w, uncond_context=uncond))
    expected = seq(z, 2.0)
    assert _max_diff(expected, z) > 0.1, "the block is (near) identity: test is vacuous"
    x, stats = jacobi(z, 0.0, 2.0)
    np.testing.assert_allclose(x, expected, atol=1e-4)
    m = N if use_sos else N - 1
    tail = m - 2 * CHUNK
    np.testing.assert_array_equal(stats.iterations, [CHUNK, CHUNK, tail])  # capped at k slots
    assert int(stats.model_calls) == int(stats.sequential_calls) == m
    # One iteration per chunk (tol = inf) is far from the answer: the comparison can fail.
    x1, stats1 = jacobi(z, jnp.inf, 2.0)
    np.testing.assert_array_equal(stats1.iterations, [1, 1, 1])
    assert _max_diff(x1, expected) > 1e-2
    # Another guidance weight and other noise reuse the one compiled function.
    z2 = jax.random.normal(jax.random.key(8), z.shape)
    np.testing.assert_allclose(jacobi(z2, 0.0, 0.5)[0], seq(z2, 0.5), atol=1e-4)
    assert len(traces) == 1


def test_deep_shallow_helper_equals_the_flow_inverse():
    flow = make_flow()
    z, ctx, mask, uncond = _data()
    kw = dict(guidance=2.0, uncond_context=uncond, guidance_rule="product")
    expected = jax.jit(lambda z: flow.inverse(z, ctx, mask, **kw))(z)
    x, stats = jax.jit(
        lambda z: jacobi_flow_inverse(flow, z, ctx, mask, chunk=CHUNK, tol=0.0, **kw)
    )(z)
    assert _max_diff(expected, z) > 0.1
    np.testing.assert_allclose(x, expected, atol=1e-4)
    assert stats.iterations.shape == (3, 3)  # (blocks, chunks)
    np.testing.assert_array_equal(stats.model_calls, [N, N, N])
    np.testing.assert_array_equal(stats.sequential_calls, [N, N, N])


def test_loose_tol_stops_early_and_still_inverts_forward_approximately():
    flow = make_flow(context_dim=0)
    z = jax.random.normal(jax.random.key(9), (2, 16, 3))
    run = jax.jit(lambda z, tol: jacobi_flow_inverse(flow, z, chunk=8, tol=tol, max_iters=32))
    exact, exact_stats = run(z, 0.0)
    loose, stats = run(z, 1e-4)
    np.testing.assert_array_equal(exact_stats.iterations, 8)
    # Round trip: the flow's forward maps the exact Jacobi sample back to its noise.
    forward = jax.jit(lambda x: flow.forward(x)[0])
    z_back = forward(exact)
    np.testing.assert_allclose(z_back, z, atol=1e-4)
    # The loose run stops before the cap in some chunks and saves model calls ...
    assert int(jnp.min(stats.iterations)) < 8
    assert int(jnp.sum(stats.model_calls)) < int(jnp.sum(stats.sequential_calls))
    assert bool(jnp.all((stats.change < 1e-4) | (stats.iterations == 8)))
    # ... and is approximate, not exact: close to the exact sample and to z after forward.
    err = _max_diff(forward(loose), z)
    assert 1e-4 < err < 0.1, err
    assert _max_diff(loose, exact) < 0.1


@pytest.mark.parametrize(
    "use_sos, chunk, max_iters, init, refresh",
    [
        (True, 1, 1, "noise", False),  # chunk 1 is the sequential decoder
        (True, 32, 32, "zeros", False),  # one chunk longer than the sequence
        (False, 3, 5, "noise", True),  # cache rewritten after every chunk
    ],
)
def test_chunk_sizes_inits_and_cache_refresh_on_an_unguided_shallow_block(
    use_sos, chunk, max_iters, init, refresh
):
    block = make_flow(use_sos=use_sos).blocks[1]  # flip permutation, no context
    z, *_ = _data()
    # Explicit rotary positions (B, N): the padded tail of the Jacobi cache must not shift them.
    positions = jnp.array([[0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 12]] * 2) * 3
    expected = jax.jit(lambda z: block.inverse(z, positions=positions))(z)
    x, stats = jax.jit(
        lambda z: jacobi_inverse(
            block, z, positions=positions, chunk=chunk, tol=0.0, max_iters=max_iters,
            init=init, refresh_cache=refresh,
        )
    )(z)  # fmt: skip
    np.testing.assert_allclose(x, expected, atol=1e-4)
    assert _max_diff(expected, block.inverse(z)) > 1e-3  # the positions matter
    m = N if use_sos else N - 1
    chunks = -(-m // chunk)
    assert stats.iterations.shape == (chunks,)
    assert int(stats.model_calls) == m + (chunks if refresh else 0)


def test_refreshed_cache_makes_every_chunk_start_exact_after_a_single_iteration():
    # With one iteration per chunk (tol = inf) the kept tokens are far from converged. The
    # first slot of a chunk sees only the cache and its own input (the previous chunk's last
    # kept token), so it is exactly the flow's inverse of the kept tokens iff the cache holds
    # the kept tokens: with refresh_cache always, without it only for the first chunk.
    block = make_flow().blocks[0]  # identity permutation, SOS: decode step j = token j
    z, *_ = _data()
    starts = np.arange(0, N, CHUNK)
    errs = {}
    for refresh in (False, True):
        x, stats = jax.jit(
            lambda z, r=refresh: jacobi_inverse(block, z, chunk=CHUNK, tol=jnp.inf, refresh_cache=r)
        )(z)
        np.testing.assert_array_equal(stats.iterations, 1)
        z_back, _ = block.forward(x)
        errs[refresh] = np.abs(np.asarray(z_back - z)[:, starts]).max(axis=(0, 2))
    np.testing.assert_allclose(errs[True], 0.0, atol=1e-5)
    assert errs[False][0] < 1e-5 and errs[False][1:].min() > 1e-3, errs[False]


@pytest.mark.parametrize("use_sos", [True, False])
def test_sliding_window_is_sequential_at_tol_zero_and_saves_calls_at_a_tight_tol(use_sos):
    block = make_flow(use_sos=use_sos, std=0.02).deep  # weakly coupled: slots settle early
    z, ctx, mask, uncond = _data()
    kw = dict(guidance=2.0, uncond_context=uncond)
    expected = jax.jit(lambda z: block.inverse(z, ctx, mask, **kw))(z)
    run = jax.jit(
        lambda z, tol: jacobi_inverse(
            block, z, ctx, mask, chunk=CHUNK, tol=tol, window="sliding", **kw
        )
    )
    m = N if use_sos else N - 1
    x, stats = run(z, 0.0)  # one accepted slot per call: the sequential decoder
    np.testing.assert_allclose(x, expected, atol=1e-4)
    assert int(stats.model_calls) == int(stats.sequential_calls) == m
    assert stats.iterations.shape == (1,)
    # A tight tol accepts settled slots early: fewer calls, the same sample.
    x, stats = run(z, 1e-10)
    np.testing.assert_allclose(x, expected, atol=1e-4)
    assert int(stats.model_calls) < m
    # tol = inf accepts the whole window after one call: wrong, so the comparison can fail.
    x, stats = run(z, jnp.inf)
    assert int(stats.model_calls) == -(-m // CHUNK)
    assert _max_diff(x, expected) > 1e-2


def test_shift_block_of_one_token_is_the_identity():
    block = make_flow(use_sos=False).blocks[0]
    z = jax.random.normal(jax.random.key(1), (2, 1, 3))
    x, stats = jacobi_inverse(block, z, chunk=4)
    np.testing.assert_array_equal(x, z)
    assert stats.iterations.shape == (0,) and int(stats.model_calls) == 0


def test_relative_change_is_the_worst_examples_squared_ratio_over_real_slots():
    new = jnp.array([[[1.0], [2.0], [50.0]], [[3.0], [4.0], [-7.0]]])  # (B=2, K=3, D=1)
    old = jnp.array([[[1.0], [1.0], [0.0]], [[3.0], [4.5], [9.0]]])
    valid = jnp.array([True, True, False])  # the third slot is tail padding
    # example 0: 1 / (1 + 4) = 0.2; example 1: 0.25 / (9 + 16) = 0.01
    np.testing.assert_allclose(relative_change(new, old, valid), 0.2, rtol=1e-6)
    np.testing.assert_allclose(relative_change(new[1:], old[1:], valid), 0.01, rtol=1e-6)
    # STARFlow's pooled ratio: (1 + 0.25) / (5 + 25)
    np.testing.assert_allclose(relative_change(new, old, valid, "pooled"), 1.25 / 30, rtol=1e-6)
    # Per slot (sliding window): max over examples of each slot's ratio; padding counts 0.
    per_slot = relative_change(new, old, valid, per_slot=True)
    np.testing.assert_allclose(per_slot, [0.0, max(1 / 4, 0.25 / 16), 0.0], rtol=1e-6)
    assert float(relative_change(old, old, valid)) == 0.0
    assert float(relative_change(jnp.zeros_like(new), jnp.zeros_like(new), valid)) == 0.0


def test_bad_arguments_are_rejected():
    block = make_flow().blocks[0]
    z, *_ = _data()
    with pytest.raises(ValueError, match="chunk"):
        jacobi_inverse(block, z, chunk=0)
    with pytest.raises(ValueError, match="init"):
        jacobi_inverse(block, z, init="previous")
    with pytest.raises(ValueError, match="window"):
        jacobi_inverse(block, z, window="rolling")
    with pytest.raises(ValueError, match="batch_reduce"):
        jacobi_inverse(block, z, batch_reduce="mean")
    with pytest.raises(ValueError, match="guidance_rule"):
        jacobi_inverse(block, z, guidance_rule="linear")
