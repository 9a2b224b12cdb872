"""Likelihood bookkeeping: per-dimension NLL, bits/dim, the latent-norm regulariser."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def nll_per_dim(z: jax.Array, logdet: jax.Array) -> jax.Array:
    """Per-example training loss in nats/dim: 0.5 mean(z^2) - logdet/dims (TarFlow/STARFlow's
    loss; drops the constant 0.5 log 2pi). `logdet` is the per-example total log|det dz/dx|."""
    dims = math.prod(z.shape[1:])
    z = z.astype(jnp.float32).reshape(z.shape[0], -1)
    return 0.5 * jnp.mean(jnp.square(z), axis=-1) - logdet / dims


def bits_per_dim(
    z: jax.Array, logdet: jax.Array, *, num_levels: int | None = None, data_range: float = 2.0
) -> jax.Array:
    """Per-example exact NLL in bits/dim of the continuous density, including 0.5 log 2pi.

    With `num_levels` (data quantised to that many levels spread over `data_range`, e.g. 256
    levels on [-1, 1]) and uniformly dequantised inputs, adds log(num_levels / data_range): the
    result is then the usual discrete-data bits/dim bound (TarFlow's `+ log 128` for 8-bit)."""
    nats = nll_per_dim(z, logdet) + 0.5 * math.log(2 * math.pi)
    if num_levels is not None:
        nats = nats + math.log(num_levels / data_range)
    return nats / math.log(2.0)


def latent_norm_penalty(latents: Sequence[jax.Array]) -> jax.Array:
    """STARFlow's guard against drifting intermediate latents: sum over the given tensors of
    mean(h^2) (per batch; scale by the configured coefficient, 1e-4 in STARFlow)."""
    if not latents:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.mean(jnp.square(h.astype(jnp.float32))) for h in latents)
