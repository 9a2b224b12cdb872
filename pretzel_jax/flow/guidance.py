"""Classifier-free guidance for autoregressive flows (all fp32).

- STARFlow's Gaussian-product rule: the per-dimension Gaussian proportional to
  N(mu_c, sigma_c^2)^(1+w) / N(mu_u, sigma_u^2)^w, with the variance ratio clipped at 1 so the
  precision stays >= 1/sigma_c^2 (a valid, mode-seeking Gaussian at any w >= 0).
- TarFlow's additive rule: linear extrapolation of the head outputs (a, mu).
With w = 0 both return the conditional parameters exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RULES = ("product", "additive")


def gaussian_product(mu_c, sigma_c, mu_u, sigma_u, w) -> tuple[jax.Array, jax.Array]:
    s = jnp.square(jnp.minimum(sigma_c / sigma_u, 1.0))
    denom = 1.0 + w - w * s
    return ((1.0 + w) * mu_c - w * s * mu_u) / denom, sigma_c * jax.lax.rsqrt(denom)


def additive(a_c, mu_c, a_u, mu_u, w) -> tuple[jax.Array, jax.Array]:
    return a_c + w * (a_c - a_u), mu_c + w * (mu_c - mu_u)
