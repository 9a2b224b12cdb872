"""Block-Jacobi sampling of AF blocks (STARFlow's parallel decoder), compiled once.

The inverse of an AF block is a triangular fixed point: x_j = mu_j(x_<j) + sigma_j(x_<j) z_j.
Sequential decoding makes M transformer calls of one token each (M = N with SOS, N - 1 for the
shift variant). Block-Jacobi splits the M decode steps into chunks of K and, per chunk, iterates

    g <- mu(prev, g) + sigma(prev, g) * z      (one transformer call on the K slots)

from an initial guess g (the noise itself by default, as STARFlow), where the input of slot t is
the token of slot t-1 (the previous chunk's last token, or SOS / token 0, for the chunk's first
slot). Every call writes its K keys/values at the chunk's FIXED cache slots, so a rejected
iterate is overwritten by the next one. Because the system is triangular, after i calls the
first i slots of the chunk are exact: a chunk of k real slots is exact after k calls, so its
iterations are capped at min(max_iters, k), and `tol = 0` reproduces the sequential decoder (up
to float rounding) with the same number of model calls, M.

Convergence criterion (STARFlow's `MetaBlock.jacobi`, made per example): after an iteration,

    r_b = sum_{t, d} (g_new - g_old)^2 / sum_{t, d} g_new^2       per example b
    stop when  max_b r_b < tol   (or after min(max_iters, k) iterations)

where the sums run over the chunk's real slots (the padding of a short tail chunk excluded)
and the conditional half of a CFG batch (both halves follow the same guided trajectory); 0/0
counts as 0. The first iteration always runs (it compares against the initial guess). This
is the SQUARED relative change with the new iterate in the denominator, exactly STARFlow's
`mean((new - old)^2) / mean(new^2)` for batch 1. STARFlow pools the batch (one ratio of sums
over all examples: `batch_reduce="pooled"`); the default takes the worst example, so a batch
stops only when every sample has converged. tol = 1e-3 therefore means a relative L2 change
below ~3.2%.

Cache consistency: when a chunk stops, its cache holds the keys/values of the inputs of the
LAST call, i.e. of the previous iterate g_old, while the kept tokens are g_new. They differ by
the last change, which the criterion bounds (relative L2 <= sqrt(tol)); the next chunk's first
input is the kept token itself. So later chunks see the final tokens up to tol, as in STARFlow.
With tol = 0 the cache is exact: the inputs of call k are outputs of call k-1 on slots
0 .. k-2, which are exact by then. `refresh_cache=True` adds one call per chunk that rewrites
the cache from the kept tokens (outputs discarded), for callers who want it exact at any tol.

Everything is one `lax.scan` over chunks with a `lax.while_loop` inside: chunk and max_iters
are static; z, context, guidance and tol may be traced (no recompilation when they change).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pretzel_jax.flow.block import AFBlock
from pretzel_jax.flow.stack import DeepShallowFlow

INITS = ("noise", "zeros")
BATCH_REDUCTIONS = ("max", "pooled")
_TINY = 1e-30


class JacobiStats(NamedTuple):
    """Cost of one block's Jacobi inverse (model call = one transformer pass over a chunk;
    the one-off context prefill, the same for both decoders, is not counted)."""

    iterations: jax.Array  # (num_chunks,) int32: transformer calls until the chunk stopped
    change: jax.Array  # (num_chunks,) fp32: the criterion (per batch_reduce) at the last call
    model_calls: jax.Array  # () int32: sum of iterations (+ num_chunks with refresh_cache)
    sequential_calls: jax.Array  # () int32: M, the calls of the sequential decoder


class FlowJacobiStats(NamedTuple):
    """`JacobiStats` of every block of a DeepShallowFlow, indexed like `flow.blocks` (data ->
    noise order: shallow blocks first, the deep block last; sampling runs them in reverse)."""

    iterations: jax.Array  # (num_blocks, num_chunks)
    change: jax.Array  # (num_blocks, num_chunks)
    model_calls: jax.Array  # (num_blocks,)
    sequential_calls: jax.Array  # (num_blocks,)


def _relative_change(new, old, valid, batch_reduce: str = "max"):
    """sum (new - old)^2 / sum new^2 over the valid slots: the max over examples, or pooled over
    the batch (STARFlow). See the module docstring."""
    w = valid[None, :, None].astype(new.dtype)
    num = jnp.sum(w * jnp.square(new - old), axis=(1, 2))
    den = jnp.sum(w * jnp.square(new), axis=(1, 2))
    if batch_reduce == "pooled":
        num, den = jnp.sum(num), jnp.sum(den)
    r = jnp.where(num > 0, num / jnp.maximum(den, _TINY), 0.0)
    return jnp.max(r)


def jacobi_inverse(
    block: AFBlock,
    z,
    context=None,
    context_mask=None,
    positions=None,
    *,
    chunk: int = 16,
    tol: float | jax.Array = 1e-3,
    max_iters: int = 32,
    guidance: float | jax.Array = 0.0,
    uncond_context=None,
    uncond_context_mask=None,
    guidance_rule: str = "product",
    init: str = "noise",
    refresh_cache: bool = False,
    batch_reduce: str = "max",
) -> tuple[jax.Array, JacobiStats]:
    """z (B, N, D) -> (x (B, N, D) fp32, JacobiStats): `block.inverse` by block-Jacobi.

    Same arguments and CFG semantics as `AFBlock.inverse` (the batch is doubled [cond; uncond]
    when `uncond_context` is given). chunk: slots per Jacobi block (static; the last chunk is
    padded when it does not divide M, its padding excluded from the criterion and never seen
    by real slots). tol: threshold of the squared relative change (module docstring); 0 runs
    every chunk to min(max_iters, its real slots) iterations, i.e. the sequential result;
    inf runs one iteration per chunk. init: the first guess, "noise" (the block's own noise,
    STARFlow) or "zeros". refresh_cache: one extra call per chunk writing the cache from the
    kept tokens. batch_reduce: "max" (every example must converge) or "pooled" (STARFlow: one
    ratio of sums over the whole batch).
    """
    if chunk < 1 or max_iters < 1:
        raise ValueError(f"chunk and max_iters must be >= 1, got {chunk} and {max_iters}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if batch_reduce not in BATCH_REDUCTIONS:
        raise ValueError(f"batch_reduce must be one of {BATCH_REDUCTIONS}, got {batch_reduce!r}")
    b, n, d = z.shape
    m = n if block.sos is not None else n - 1  # decode steps
    num_chunks = -(-m // chunk)
    padded = num_chunks * chunk
    setup = block._decode_setup(
        z,
        context,
        context_mask,
        positions,
        uncond_context=uncond_context,
        uncond_context_mask=uncond_context_mask,
        guidance_rule=guidance_rule,
        steps_capacity=padded,
    )
    noise = jnp.pad(setup.noise, ((0, 0), (0, padded - m), (0, 0)))
    guess = noise if init == "noise" else jnp.zeros_like(noise)
    valid = jnp.arange(padded) < m
    tol = jnp.asarray(tol, jnp.float32)

    def decode(inputs, cache, step, z_chunk):
        return block._decode_chunk(
            setup,
            inputs,
            cache,
            step,
            z_chunk,
            guidance=guidance,
            guidance_rule=guidance_rule,
        )

    def one_chunk(carry, c):
        prev, cache = carry  # prev (B, D): the input of the chunk's first slot (final)
        step = c * chunk
        z_chunk = jax.lax.dynamic_slice_in_dim(noise, step, chunk, axis=1)
        g0 = jax.lax.dynamic_slice_in_dim(guess, step, chunk, axis=1)
        v = jax.lax.dynamic_slice_in_dim(valid, step, chunk)
        # A chunk of k real slots is exact after k calls (triangular system): cap there.
        cap = jnp.minimum(max_iters, jnp.minimum(chunk, m - step))

        def inputs_of(g):  # input of slot t = token of slot t-1
            return jnp.concatenate([prev[:, None], g[:, :-1]], axis=1)

        def body(state):
            i, g, _, cache = state
            g_new, _, _, cache = decode(inputs_of(g), cache, step, z_chunk)
            return i + 1, g_new, _relative_change(g_new, g, v, batch_reduce), cache

        def keep_going(state):
            i, _, change, _ = state
            return (i < cap) & ((i == 0) | (change >= tol))

        state = (jnp.zeros((), jnp.int32), g0, jnp.full((), jnp.inf, jnp.float32), cache)
        iters, g, change, cache = jax.lax.while_loop(keep_going, body, state)
        if refresh_cache:
            _, _, _, cache = decode(inputs_of(g), cache, step, z_chunk)
        return (g[:, -1], cache), (g, iters, change)

    if num_chunks:
        _, (gs, iters, change) = jax.lax.scan(
            one_chunk, (setup.first, setup.cache), jnp.arange(num_chunks)
        )
        xs = jnp.moveaxis(gs, 0, 1).reshape(b, padded, d)[:, :m]
    else:  # N = 1 without SOS: the block is the identity
        iters, change = jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
        xs = setup.noise
    x, _, _ = block._decode_finish(setup, xs, xs, xs)  # (mu, sigma) are not kept here
    calls = jnp.sum(iters) + (num_chunks if refresh_cache else 0)
    stats = JacobiStats(iters, change, calls.astype(jnp.int32), jnp.asarray(m, jnp.int32))
    return x, stats


def jacobi_flow_inverse(
    flow: DeepShallowFlow,
    z,
    context=None,
    context_mask=None,
    positions=None,
    *,
    chunk: int = 16,
    tol: float | jax.Array = 1e-3,
    max_iters: int = 32,
    guidance: float | jax.Array = 0.0,
    uncond_context=None,
    uncond_context_mask=None,
    guidance_rule: str = "product",
    init: str = "noise",
    refresh_cache: bool = False,
    batch_reduce: str = "max",
) -> tuple[jax.Array, FlowJacobiStats]:
    """`DeepShallowFlow.inverse` with every block decoded by `jacobi_inverse`: the deep block
    first (guided when `uncond_context` is given), then the shallow blocks in reverse order,
    unguided. Returns (x fp32, FlowJacobiStats indexed like `flow.blocks`)."""
    flow._check_tokens(z)
    n = z.shape[1]
    kw = dict(
        chunk=chunk,
        tol=tol,
        max_iters=max_iters,
        init=init,
        refresh_cache=refresh_cache,
        batch_reduce=batch_reduce,
    )
    h, deep_stats = jacobi_inverse(
        flow.deep,
        z,
        context,
        context_mask,
        positions,
        guidance=guidance,
        uncond_context=uncond_context,
        uncond_context_mask=uncond_context_mask,
        guidance_rule=guidance_rule,
        **kw,
    )
    stats = [deep_stats]
    for block in reversed(flow.blocks[:-1]):
        h, s = jacobi_inverse(block, h, positions=flow._shallow_positions(positions, n), **kw)
        stats.append(s)
    stats = stats[::-1]  # index like flow.blocks
    stacked = FlowJacobiStats(*(jnp.stack(field) for field in zip(*stats)))
    return h.astype(jnp.float32), stacked
