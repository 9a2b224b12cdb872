"""Input noise for flows: Gaussian augmentation, uniform dequantisation, Tweedie denoising."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def gaussian_augment(x: jax.Array, key: jax.Array, std: float) -> jax.Array:
    """x~ = x + std * eps (TarFlow/STARFlow noise augmentation; makes sampling well posed)."""
    return x + std * jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)


def uniform_dequantize(levels: jax.Array, key: jax.Array, num_levels: int) -> jax.Array:
    """Integer levels in [0, num_levels) -> continuous values in [-1, 1]: (v + u)/L * 2 - 1 with
    u ~ U[0, 1). Gives a variational bound on the discrete likelihood (bits/dim models)."""
    u = jax.random.uniform(key, levels.shape, jnp.float32)
    return (levels.astype(jnp.float32) + u) / num_levels * 2.0 - 1.0


def levels_to_unit_range(levels: jax.Array, num_levels: int) -> jax.Array:
    """Bin centres in [-1, 1] (no noise): what Gaussian augmentation is added to."""
    return (levels.astype(jnp.float32) + 0.5) / num_levels * 2.0 - 1.0


def unit_range_to_levels(x: jax.Array, num_levels: int) -> jax.Array:
    return jnp.clip(jnp.floor((x + 1.0) / 2.0 * num_levels), 0, num_levels - 1).astype(jnp.int32)


def tweedie_denoise(
    log_prob: Callable[[jax.Array], jax.Array], x: jax.Array, sigma: float
) -> jax.Array:
    """One score step x + sigma^2 * grad_x log p(x) (Tweedie's formula for x = clean + sigma*eps).

    `log_prob(x)` returns per-example log-densities (B,) in nats, summed over dimensions: their
    batch sum has the per-example scores as gradient (examples are independent)."""
    score = jax.grad(lambda v: jnp.sum(log_prob(v)))(x)
    return x + sigma**2 * score
