"""Pure-jnp references for the flow-affine kernels, and the math they share with the kernels.

Math (STARFlow conventions, everything in fp32 whatever the operand dtype):

    o = h @ W + b                      h (B, N, C), W (C, 2D), b (2D,); fp32 accumulation
    o = c * tanh(o / c)                only when soft_clip = c > 0
    a, mu = o[..., :D], o[..., D:]
    sigma = softplus(a + log(e - 1))   (use_softplus; a = 0 gives sigma = 1) or exp(a)
    z = (x - mu) / sigma               x (B, N, D)
    sum_log_sigma[b] = sum_{n,d} m[b,n] log sigma,   sum_z2[b] = sum_{n,d} m[b,n] z^2

m is the optional position mask (B, N) (bool, or float weights; no mask: m = 1); z is returned
for every position, masked or not. With per_position the sums run over d only: (B, N).

Sampling (`guided_sample_step_reference`): one token of a doubled batch [cond; uncond], STARFlow's
Gaussian-product classifier-free guidance.

The reference uses XLA's default dot precision, which on TPU (and with TF32 on GPU) is below fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) = 1: sigma = 1 when a = 0


def sigma_and_log(a: jax.Array, use_softplus: bool) -> tuple[jax.Array, jax.Array]:
    if use_softplus:
        sigma = jax.nn.softplus(a + SOFTPLUS_ONE)
        return sigma, jnp.log(sigma)
    return jnp.exp(a), a


def soft_clip_fn(o: jax.Array, soft_clip: float) -> jax.Array:
    return soft_clip * jnp.tanh(o / soft_clip) if soft_clip > 0 else o


def affine_forward_reference(
    h, w, b, x, *, soft_clip: float, use_softplus: bool, mask=None, per_position: bool = False
):
    """Pure jnp: (z (B, N, D) fp32, sum_log_sigma, sum_z2), the sums (B,) or per position (B, N).

    mask (B, N) bool or float: each position's log sigma and z^2 terms are multiplied by it
    (differentiable in mask here; `affine_forward` treats the mask as a constant).
    """
    o = jnp.dot(h, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    o = soft_clip_fn(o, soft_clip)
    a, mu = jnp.split(o, 2, axis=-1)
    sigma, log_sigma = sigma_and_log(a, use_softplus)
    z = (x.astype(jnp.float32) - mu) / sigma
    z2 = jnp.square(z)
    if mask is not None:
        m = jnp.asarray(mask).astype(jnp.float32)[..., None]
        log_sigma, z2 = log_sigma * m, z2 * m
    axes = 2 if per_position else (1, 2)
    return z, jnp.sum(log_sigma, axis=axes), jnp.sum(z2, axis=axes)


def guided_math(a_c, a_u, mu_c, mu_u, z, w, use_softplus):
    """Gaussian-product CFG on fp32 arrays (shared by the reference and the kernel body)."""
    sigma_c, _ = sigma_and_log(a_c, use_softplus)
    sigma_u, _ = sigma_and_log(a_u, use_softplus)
    s = jnp.square(jnp.minimum(sigma_c / sigma_u, 1.0))
    denom = 1.0 + w - w * s
    mu_eff = ((1.0 + w) * mu_c - w * s * mu_u) / denom
    sigma_eff = sigma_c * jax.lax.rsqrt(denom)
    return mu_eff + sigma_eff * z, mu_eff, sigma_eff


def guided_sample_step_reference(a, mu, z, guidance, *, use_softplus: bool):
    """Pure jnp: a, mu (2B, D) = [cond; uncond] head outputs, z (B, D) -> (x, mu_eff, sigma_eff)."""
    bsz = z.shape[0]
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    a, mu, w = f32(a), f32(mu), f32(guidance)
    return guided_math(a[:bsz], a[bsz:], mu[:bsz], mu[bsz:], f32(z), w, use_softplus)
