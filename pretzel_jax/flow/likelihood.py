"""Likelihood bookkeeping: per-dimension NLL, bits/dim, the latent-norm regulariser."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def nll_per_dim(z: jax.Array, logdet: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-example training loss in nats/dim: 0.5 mean(z^2) - logdet/dims (TarFlow/STARFlow's
    loss; drops the constant 0.5 log 2pi). `logdet` is the per-example total log|det dz/dx|
    (over the same positions). `mask` (B, N) (z is (B, N, D)): only those positions count,
    in the mean and in dims; a row with none gives 0."""
    z = z.astype(jnp.float32)
    if mask is None:
        dims = math.prod(z.shape[1:])
        return 0.5 * jnp.mean(jnp.square(z.reshape(z.shape[0], -1)), axis=-1) - logdet / dims
    mask = mask.astype(jnp.float32)
    dims = jnp.sum(mask, axis=1) * z.shape[-1]
    sq = jnp.sum(jnp.square(z) * mask[..., None], axis=(1, 2))
    return jnp.where(dims > 0, (0.5 * sq - logdet) / jnp.maximum(dims, 1.0), 0.0)


def bits_per_dim(
    z: jax.Array,
    logdet: jax.Array,
    *,
    num_levels: int | None = None,
    data_range: float = 2.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-example exact NLL in bits/dim of the continuous density, including 0.5 log 2pi.

    With `num_levels` (data quantised to that many levels spread over `data_range`, e.g. 256
    levels on [-1, 1]) and uniformly dequantised inputs, adds log(num_levels / data_range): the
    result is then the usual discrete-data bits/dim bound (TarFlow's `+ log 128` for 8-bit).
    `mask`: as in `nll_per_dim`."""
    nats = nll_per_dim(z, logdet, mask) + 0.5 * math.log(2 * math.pi)
    if num_levels is not None:
        nats = nats + math.log(num_levels / data_range)
    return nats / math.log(2.0)


def latent_norm_penalty(latents: Sequence[jax.Array]) -> jax.Array:
    """STARFlow's guard against drifting intermediate latents: sum over the given tensors of
    mean(h^2) (per batch; scale by the configured coefficient, 1e-4 in STARFlow)."""
    if not latents:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.mean(jnp.square(h.astype(jnp.float32))) for h in latents)
