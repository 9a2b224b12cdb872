"""One autoregressive flow (AF) block, as STARFlow defines it.

Forward (data -> noise), for block input x (B, N, D):
  xp = permute(x)                              identity or flip along tokens
  inputs = [sos, xp_0 .. xp_{N-2}]             SOS variant (every token transformed), or
         = xp and the head output shifted right TarFlow's shift variant (token 0 = identity)
  h = Transformer([proj_ctx(context) ; proj_in(inputs)])   causal; context only in the deep block
  o = soft_clip(proj_out(final_norm(h)))       fp32, zero-initialised head -> identity at init
  [a | mu] = o; sigma = softplus(a + 0.5413) or exp(a)
  z = unpermute((xp - mu) / sigma);  logdet = -sum log sigma
Inverse: token by token with a KV cache (one `lax.scan`, compiled once), optional CFG.
Rotary angles belong to sequence slots, not to the tokens a permutation moved there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.flow import guidance as cfg_rules
from pretzel_jax.flow.config import FlowConfig
from pretzel_jax.nn import Dense, LayerStack, RMSNorm, rope_1d, rope_angles, rope_sectioned
from pretzel_jax.nn.sharding import param

SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) = 1: sigma = 1 at init


def _permute(x: jax.Array, kind: str) -> jax.Array:
    return jnp.flip(x, axis=1) if kind == "flip" else x


class AFBlock(nnx.Module):
    def __init__(
        self,
        cfg: FlowConfig,
        num_layers: int,
        permutation: str,
        *,
        conditioned: bool,
        rngs: nnx.Rngs,
    ):
        tcfg = cfg.transformer
        kw = dict(
            rngs=rngs,
            param_dtype=jnp.dtype(cfg.param_dtype),
            compute_dtype=jnp.dtype(cfg.compute_dtype),
        )
        d, w = cfg.token_dim, cfg.width
        self.sos = (
            param(jax.random.normal(rngs.params(), (d,)), ("latent",)) if cfg.use_sos else None
        )
        self.proj_in = Dense(d, w, axes=("latent", "embed"), **kw)
        self.proj_ctx = (
            Dense(cfg.context_dim, w, axes=(None, "embed"), **kw) if conditioned else None
        )
        self.layers = LayerStack(tcfg, num_layers, rngs=rngs)
        self.final_norm = RMSNorm(w, unit_offset=True) if cfg.use_final_norm else None
        zeros = nnx.initializers.zeros
        self.proj_out = Dense(
            w, 2 * d, axes=("embed", "latent"), kernel_init=zeros, bias_init=zeros, **kw
        )
        self.cfg = cfg
        self.permutation = permutation
        self.conditioned = conditioned

    # -- pieces shared by forward and inverse -------------------------------------------------

    def _rope(self, positions: jax.Array | None, batch: int, length: int):
        cfg = self.cfg
        if cfg.rope == "none":
            return None
        if cfg.rope == "sectioned":
            if positions is None:
                raise ValueError(
                    "FlowConfig.rope='sectioned' needs explicit positions (B, L, axes)"
                )
            return rope_angles(positions, *rope_sectioned(cfg.rope_sections, cfg.rope_theta))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        return rope_angles(positions, *rope_1d(cfg.head_dim, cfg.rope_theta))

    def _head(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Transformer output -> (a, mu) in fp32 after the soft clip."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        o = self.proj_out(h).astype(jnp.float32)
        if self.cfg.soft_clip > 0:
            c = self.cfg.soft_clip
            o = c * jnp.tanh(o / c)
        a, mu = jnp.split(o, 2, axis=-1)
        return a, mu

    def _sigma(self, a: jax.Array) -> jax.Array:
        return jax.nn.softplus(a + SOFTPLUS_ONE) if self.cfg.use_softplus else jnp.exp(a)

    def _context(self, context, context_mask, batch):
        if not self.conditioned:
            return None, None
        if context is None:
            raise ValueError("this flow block is conditioned (context_dim > 0): pass `context`")
        c = self.proj_ctx(context)
        if context_mask is None:
            context_mask = jnp.ones(c.shape[:2], bool)
        return c, context_mask

    # -- data -> noise --------------------------------------------------------------------------

    def params(self, x, context=None, context_mask=None, positions=None):
        """Teacher-forced (a, mu, sigma) for every token of permuted x, plus the permuted x."""
        b, n, _ = x.shape
        xp = _permute(x, self.permutation)
        if self.sos is not None:
            sos = jnp.broadcast_to(self.sos[...].astype(xp.dtype), (b, 1, xp.shape[-1]))
            inputs = jnp.concatenate([sos, xp[:, :-1]], axis=1)
        else:
            inputs = xp
        h = self.proj_in(inputs)
        c, cmask = self._context(context, context_mask, b)
        kv_mask = None
        if c is not None:
            h = jnp.concatenate([c.astype(h.dtype), h], axis=1)
            kv_mask = jnp.concatenate([cmask, jnp.ones((b, n), bool)], axis=1)
        h, _ = self.layers(h, rope=self._rope(positions, b, h.shape[1]), kv_mask=kv_mask)
        a, mu = self._head(h[:, h.shape[1] - n :])
        if self.sos is None:  # output t predicts token t+1; token 0 gets (0, 0) -> identity
            a = jnp.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0)))
            mu = jnp.pad(mu[:, :-1], ((0, 0), (1, 0), (0, 0)))
        return a, mu, self._sigma(a), xp.astype(jnp.float32)

    def forward(self, x, context=None, context_mask=None, positions=None):
        """x (B, N, D) -> (z (B, N, D) fp32, logdet (B,) = sum of log|dz/dx|)."""
        _, mu, sigma, xp = self.params(x, context, context_mask, positions)
        z = (xp - mu) / sigma
        logdet = -jnp.sum(jnp.log(sigma), axis=(1, 2))
        return _permute(z, self.permutation), logdet

    # -- noise -> data --------------------------------------------------------------------------

    def inverse(
        self,
        z,
        context=None,
        context_mask=None,
        positions=None,
        *,
        guidance: float | jax.Array = 0.0,
        uncond_context=None,
        uncond_context_mask=None,
        guidance_rule: str = "product",
        return_params: bool = False,
    ):
        """z (B, N, D) -> x, sequentially with a KV cache. CFG runs when `uncond_context` is
        given: the batch is doubled [cond; uncond], both halves follow the guided trajectory.
        With `return_params`, also returns the (mu, sigma) used at each token (permuted order)."""
        if guidance_rule not in cfg_rules.RULES:
            raise ValueError(
                f"guidance_rule must be one of {cfg_rules.RULES}, got {guidance_rule!r}"
            )
        b, n, d = z.shape
        zp = _permute(z.astype(jnp.float32), self.permutation)
        guided = uncond_context is not None
        if guided:
            if not self.conditioned:
                raise ValueError("guidance needs a conditioned (deep) block")
            if context_mask is None:
                context_mask = jnp.ones(context.shape[:2], bool)
            if uncond_context_mask is None:
                uncond_context_mask = jnp.ones(uncond_context.shape[:2], bool)
            context = jnp.concatenate([context, uncond_context], axis=0)
            context_mask = jnp.concatenate([context_mask, uncond_context_mask], axis=0)
            if positions is not None:
                positions = jnp.concatenate([positions, positions], axis=0)
        bb = 2 * b if guided else b
        c, cmask = self._context(context, context_mask, bb)
        lc = 0 if c is None else c.shape[1]
        cache = self.layers.init_cache(bb, lc + n, jnp.dtype(self.cfg.compute_dtype))
        rope = self._rope(positions, bb, lc + n)
        if c is not None:  # prefill the context prefix once
            rope_c = None if rope is None else (rope[0][:, :lc], rope[1][:, :lc])
            _, cache = self.layers(c, rope=rope_c, kv_mask=cmask, cache=cache)

        def step(carry, t):
            prev, cache = carry
            slot = lc + t - (0 if self.sos is not None else 1)
            rope_t = None
            if rope is not None:
                rope_t = tuple(jax.lax.dynamic_slice_in_dim(r, slot, 1, axis=1) for r in rope)
            h = self.proj_in(prev[:, None, :].astype(jnp.dtype(self.cfg.compute_dtype)))
            h, cache = self.layers(h, rope=rope_t, cache=cache)
            a, mu = self._head(h)
            a, mu = a[:, 0], mu[:, 0]
            if guided:
                if guidance_rule == "product":
                    mu_g, sigma_g = cfg_rules.gaussian_product(
                        mu[:b], self._sigma(a[:b]), mu[b:], self._sigma(a[b:]), guidance
                    )
                else:
                    a_g, mu_g = cfg_rules.additive(a[:b], mu[:b], a[b:], mu[b:], guidance)
                    sigma_g = self._sigma(a_g)
                mu, sigma = jnp.concatenate([mu_g] * 2), jnp.concatenate([sigma_g] * 2)
            else:
                sigma = self._sigma(a)
            zt = jax.lax.dynamic_index_in_dim(zp, t, axis=1, keepdims=False)
            x_t = mu + sigma * (jnp.concatenate([zt] * 2) if guided else zt)
            return (x_t, cache), (x_t[:b], mu[:b], sigma[:b])

        if self.sos is not None:
            first = jnp.broadcast_to(self.sos[...].astype(jnp.float32), (bb, d))
            ts = jnp.arange(n)
        else:  # token 0 passes through unchanged
            first = jnp.concatenate([zp[:, 0]] * 2) if guided else zp[:, 0]
            ts = jnp.arange(1, n)
        _, (xs, mus, sigmas) = jax.lax.scan(step, (first, cache), ts)
        xs, mus, sigmas = (jnp.moveaxis(v, 0, 1) for v in (xs, mus, sigmas))
        if self.sos is None:
            xs = jnp.concatenate([zp[:, :1], xs], axis=1)
            mus = jnp.pad(mus, ((0, 0), (1, 0), (0, 0)))
            sigmas = jnp.pad(sigmas, ((0, 0), (1, 0), (0, 0)), constant_values=1.0)
        x = _permute(xs, self.permutation)
        return (x, (mus, sigmas)) if return_params else x
