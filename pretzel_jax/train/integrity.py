"""Per-array checksums and finiteness of a train state, computed on device.

A checkpoint stores one checksum per state leaf, taken from the arrays being saved; a restore
recomputes them from the arrays it read and refuses the checkpoint on any difference. Computing
on device keeps this independent of the sharding and of the number of hosts (each reduction is
exact modular arithmetic, so its value does not depend on the order of the partial sums) and
costs no extra host copy of the state.

The checksum of a leaf is two 32-bit sums over its raw bits read as uint32 words: the plain sum
and the sum weighted by (2 * flat index + 1). An odd weight is invertible mod 2**32, so changing
any single word always changes the second sum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _words(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 words (shape kept; 8-byte items gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every element, built from per-axis iotas (no reshape, so a
    sharded array stays sharded)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_summary(x: jax.Array) -> jax.Array:
    """[plain sum, weighted sum, all finite] of one leaf, as uint32."""
    words = _words(x)
    weights = 2 * _flat_index(words.shape) + 1
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.stack(
        [
            jnp.sum(words, dtype=jnp.uint32),
            jnp.sum(words * weights, dtype=jnp.uint32),
            jnp.asarray(finite, jnp.uint32),
        ]
    )


_summaries = jax.jit(lambda tree: jax.tree.map(_leaf_summary, tree))


def inspect(state: Any) -> tuple[dict[str, str], list[str]]:
    """({leaf path: checksum hex}, [paths of leaves holding a NaN or an infinity])."""
    summaries = jax.device_get(_summaries(state))
    checksums, nonfinite = {}, []
    for path, (plain, weighted, finite) in jax.tree_util.tree_leaves_with_path(summaries):
        key = jax.tree_util.keystr(path)
        checksums[key] = f"{int(plain):08x}{int(weighted):08x}"
        if not finite:
            nonfinite.append(key)
    return checksums, nonfinite


def mismatches(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """Leaf paths whose checksum differs (or is missing on either side)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
