"""Blockwise LM cross-entropy: the logits of a (B, S, D) hidden state against a (D, V) head are
made one chunk of positions at a time under `jax.checkpoint`, so at a 152k vocabulary and 4k
tokens the full (B, S, V) fp32 logits never exist (forward or backward): peak extra memory is
one (B, chunk, V) block."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk: int = 512,
    compute_dtype=None,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and the count of correct argmax predictions over `mask`.

    hidden (B, S, D); head (D, V) (an untied LM head's kernel, or a tied embedding transposed);
    targets (B, S) int; mask (B, S). Logits are computed in `compute_dtype` (default: hidden's)
    with fp32 accumulation; log-softmax in fp32. -> (sum of masked NLL, masked correct count),
    both fp32 scalars: divide by the mask's sum for means."""
    b, s, d = hidden.shape
    dtype = compute_dtype or hidden.dtype
    chunk = max(1, min(chunk, s))
    pad = -s % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (s + pad) // chunk
    to_chunks = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # noqa: E731
    w = head.astype(dtype)

    @jax.checkpoint  # the backward recomputes each block's logits instead of storing them
    def block(h, t, m):
        logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), w, preferred_element_type=jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        m = m.astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
        return jnp.sum((logz - picked) * m), jax.lax.stop_gradient(jnp.sum(correct * m))

    def body(carry, xs):
        nll, correct = block(*xs)
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (nll, correct), _ = jax.lax.scan(
        body, (zero, zero), (to_chunks(hidden), to_chunks(targets), to_chunks(mask))
    )
    return nll, correct
