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

Sliding window (`window="sliding"`): instead of fixed chunks, one window of K slots starting
at the first unaccepted slot p. After each call the window accepts its leading slots that are
exact up to tol and moves past them: slot p always (its inputs are accepted tokens), and slot
p+j+1 while every slot p .. p+j changed by less than tol in that call (then the inputs that
produced slot p+j+1 were already final). Here the criterion is per SLOT (the same squared
relative change, summed over channels only), so tol bounds the error of each accepted token's
inputs, not of a chunk on average. Slots already in the window keep their latest iterate; slots
entering it start from the initial guess. Every call accepts >= 1 slot, so at most M calls;
max_iters does not apply. A chunked window waits for its slowest slot, the sliding one does not:
at a tight tol it needs far fewer calls for the same samples (benchmarks/flow_bench.py).

When to use it: Jacobi is faster in wall time than the sequential decoder exactly when the calls
it saves outweigh what a K-slot call costs more than a one-slot call, i.e. when
M / (Jacobi calls) > t(K-slot call) / t(one-slot call). The left side depends on the model, tol
and window (1.3x to 2.6x on the toy digits flow at K = 16), the right on the hardware: about 1
on an H200, where the sliding window was 1.06x to 1.42x faster than sequential, but 4 to 10 on
the 2-core CPU, where a 16-slot call is compute-bound and Jacobi ran 0.16x to 0.6x as fast
(benchmarks/flow_bench.py --jacobi; README Benchmarks 4). So: sequential on CPUs; on
accelerators the sliding window, with tol as loose as the samples allow.

Everything is one `lax.scan` over chunks with a `lax.while_loop` inside (sliding: one
`lax.while_loop`): chunk and max_iters are static; z, context, guidance and tol may be traced
(no recompilation when they change).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pretzel_jax.flow.block import AFBlock
from pretzel_jax.flow.stack import DeepShallowFlow

INITS = ("noise", "zeros")
WINDOWS = ("chunks", "sliding")
BATCH_REDUCTIONS = ("max", "pooled")
_TINY = 1e-30


class JacobiStats(NamedTuple):
    """Cost of one block's Jacobi inverse (model call = one transformer pass over a chunk;
    the one-off context prefill, the same for both decoders, is not counted)."""

    # Per chunk (one entry for the sliding window, which is a single moving chunk):
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


def relative_change(new, old, valid, batch_reduce: str = "max", per_slot: bool = False):
    """sum (new - old)^2 / sum new^2 over the valid slots: the max over examples, or pooled over
    the batch (STARFlow). See the module docstring. per_slot: one value per slot (K,), summed
    over channels only."""
    w = valid[None, :, None].astype(new.dtype)
    axes = 2 if per_slot else (1, 2)
    num = jnp.sum(w * jnp.square(new - old), axis=axes)
    den = jnp.sum(w * jnp.square(new), axis=axes)
    if batch_reduce == "pooled":
        num, den = jnp.sum(num, axis=0), jnp.sum(den, axis=0)
    r = jnp.where(num > 0, num / jnp.maximum(den, _TINY), 0.0)
    return r if batch_reduce == "pooled" else jnp.max(r, axis=0)


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
    window: str = "chunks",
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
    ratio of sums over the whole batch). window: "chunks" (STARFlow) or "sliding" (module
    docstring; refresh_cache and max_iters do not apply to it).
    """
    if chunk < 1 or max_iters < 1:
        raise ValueError(f"chunk and max_iters must be >= 1, got {chunk} and {max_iters}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if batch_reduce not in BATCH_REDUCTIONS:
        raise ValueError(f"batch_reduce must be one of {BATCH_REDUCTIONS}, got {batch_reduce!r}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    b, n, d = z.shape
    m = n if block.sos is not None else n - 1  # decode steps
    num_chunks = -(-m // chunk)
    # The sliding window may start at any slot < M, so it needs M + K - 1 slots of room.
    padded = num_chunks * chunk if window == "chunks" else m + chunk - 1
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
            return i + 1, g_new, relative_change(g_new, g, v, batch_reduce), cache

        def keep_going(state):
            i, _, change, _ = state
            return (i < cap) & ((i == 0) | (change >= tol))

        state = (jnp.zeros((), jnp.int32), g0, jnp.full((), jnp.inf, jnp.float32), cache)
        iters, g, change, cache = jax.lax.while_loop(keep_going, body, state)
        if refresh_cache:
            _, _, _, cache = decode(inputs_of(g), cache, step, z_chunk)
        return (g[:, -1], cache), (g, iters, change)

    def sliding():
        """One window of K slots at the first unaccepted slot p (module docstring)."""

        def body(state):
            calls, p, cur, _, cache = state
            g = jax.lax.dynamic_slice_in_dim(cur, p, chunk, axis=1)
            last = jax.lax.dynamic_index_in_dim(cur, jnp.maximum(p - 1, 0), 1, keepdims=False)
            prev = jnp.where(p == 0, setup.first, last)
            inputs = jnp.concatenate([prev[:, None], g[:, :-1]], axis=1)
            z_win = jax.lax.dynamic_slice_in_dim(noise, p, chunk, axis=1)
            g_new, _, _, cache = decode(inputs, cache, p, z_win)
            v = jax.lax.dynamic_slice_in_dim(valid, p, chunk)
            r = relative_change(g_new, g, v, batch_reduce, per_slot=True)
            # Slot p is exact; slot p+j+1 too while slots p .. p+j did not move (beyond tol).
            settled = jnp.cumprod((r < tol)[:-1].astype(jnp.int32))
            accepted = jnp.minimum(1 + jnp.sum(settled), m - p)
            cur = jax.lax.dynamic_update_slice_in_dim(cur, g_new, p, axis=1)
            return calls + 1, p + accepted, cur, jnp.max(jnp.where(v, r, 0.0)), cache

        state = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), guess)
        state = (*state, jnp.full((), jnp.inf, jnp.float32), setup.cache)
        calls, _, cur, change, _ = jax.lax.while_loop(lambda s: s[1] < m, body, state)
        return cur[:, :m], calls[None], change[None]

    if window == "sliding" and m:
        xs, iters, change = sliding()
    elif num_chunks:
        _, (gs, iters, change) = jax.lax.scan(
            one_chunk, (setup.first, setup.cache), jnp.arange(num_chunks)
        )
        xs = jnp.moveaxis(gs, 0, 1).reshape(b, padded, d)[:, :m]
    else:  # N = 1 without SOS: the block is the identity
        iters, change = jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
        xs = setup.noise
    x, _, _ = block._decode_finish(setup, xs, xs, xs)  # (mu, sigma) are not kept here
    refreshes = num_chunks if refresh_cache and window == "chunks" else 0
    calls = jnp.sum(iters) + refreshes
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
    window: str = "chunks",
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
        window=window,
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
