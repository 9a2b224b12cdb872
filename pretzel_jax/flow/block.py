"""One autoregressive flow (AF) block, as STARFlow defines it.

Forward (data -> noise), for block input x (B, N, D):
  xp = permute(x)                              identity or flip along tokens
  inputs = [sos, xp_0 .. xp_{N-2}]             SOS variant (every token transformed), or
         = xp and the head output shifted right TarFlow's shift variant (token 0 = identity)
  h = Transformer([proj_ctx(context) ; proj_in(inputs)])   causal; context only in the deep block
  o = soft_clip(proj_out(final_norm(h)))       fp32, zero-initialised head -> identity at init
  [a | mu] = o; sigma = softplus(a + 0.5413) or exp(a)
  z = unpermute((xp - mu) / sigma);  logdet = -sum log sigma
Inverse: token by token with a KV cache (one `lax.scan`, compiled once), optional CFG; the
same chunk step also drives block-Jacobi decoding (`pretzel_jax.flow.jacobi`).
Rotary angles belong to sequence slots, not to the tokens a permutation moved there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.flow import guidance as cfg_rules
from pretzel_jax.flow.config import FlowConfig
from pretzel_jax.kernels import flow_affine
from pretzel_jax.nn import Dense, LayerStack, RMSNorm, rope_1d, rope_angles, rope_sectioned
from pretzel_jax.nn.sharding import param

SOFTPLUS_ONE = flow_affine.SOFTPLUS_ONE  # softplus(SOFTPLUS_ONE) = 1: sigma = 1 at init


class DecodeSetup(NamedTuple):
    """State shared by the sequential and the block-Jacobi decoder (see `AFBlock._decode_*`)."""

    zp: jax.Array  # (B, N, D) fp32 noise in the block's permuted order
    noise: jax.Array  # (B, M, D) noise of each decode step (M = N with SOS, N - 1 without)
    first: jax.Array  # (B, D) input token of step 0: SOS, or token 0 of the shift variant
    cache: tuple  # one KVCache per layer (LayerStack.unstack_cache), context prefix prefilled
    rope: tuple[jax.Array, jax.Array] | None  # (cos, sin) for every cache slot
    prefix: int  # context prefix length: step j sits at cache slot prefix + j
    batch: int  # B (the conditional half when guided)
    guided: bool  # CFG: the transformer batch is [cond; uncond]
    layers: tuple  # the stack's unstacked() parameters, taken once for every step


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

    # -- public pieces: also the step API of an outside model (the Pretzel deep stream) ---------
    #
    # An outside model that owns the sequence layout (text and several images per row, packed
    # documents) projects its own inputs (`embed_tokens`, `embed_context`, plus anything it adds),
    # runs `hidden` over them (teacher-forced with a mask, or one chunk at a time into an external
    # `init_cache` cache), and reads `(a, mu)` with `head` and sigma with `sigma`.

    def rope(self, positions: jax.Array | None, batch: int, length: int):
        """(cos, sin) rotary tables for `positions` (B, L) or (B, L, axes), or None."""
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
        if positions.ndim == 3:  # 1-D RoPE on multi-axis ids: the first (temporal/text) axis
            positions = positions[..., 0]
        return rope_angles(positions, *rope_1d(cfg.head_dim, cfg.rope_theta))

    def embed_tokens(self, u: jax.Array) -> jax.Array:
        """Latent tokens (..., D) -> transformer inputs (..., width) (STARFlow's proj_in)."""
        return self.proj_in(u.astype(jnp.dtype(self.cfg.compute_dtype)))

    def embed_context(self, c: jax.Array) -> jax.Array:
        """Context features (..., context_dim) -> transformer inputs (STARFlow's proj_txt)."""
        if self.proj_ctx is None:
            raise ValueError("this flow block is unconditioned (context_dim = 0): no context")
        return self.proj_ctx(c)

    def init_cache(self, batch: int, size: int, dtype=None):
        """A fixed-size KV cache (stacked over layers) for `hidden(..., cache=)`."""
        return self.layers.init_cache(batch, size, jnp.dtype(dtype or self.cfg.compute_dtype))

    def hidden(self, h, *, rope=None, mask=None, kv_mask=None, cache=None, layers=None):
        """Projected inputs (B, T, width) -> (final-normed hidden state y (B, T, width), cache).
        Without a cache `mask` (B, T, T) is the full attention mask (default causal + kv_mask);
        with one, the T inputs are written at cache.index and attend to the cache (causal).
        `layers`: `self.layers.unstacked()`, taken once before a decode loop."""
        h, cache = self.layers(h, rope=rope, mask=mask, kv_mask=kv_mask, cache=cache, layers=layers)
        return self.normed(h), cache

    def head(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Final-normed hidden state -> (a, mu) in fp32 after the soft clip."""
        o = self.proj_out(y).astype(jnp.float32)
        if self.cfg.soft_clip > 0:
            c = self.cfg.soft_clip
            o = c * jnp.tanh(o / c)
        a, mu = jnp.split(o, 2, axis=-1)
        return a, mu

    def normed(self, h: jax.Array) -> jax.Array:
        return h if self.final_norm is None else self.final_norm(h)

    def sigma(self, a: jax.Array) -> jax.Array:
        return jax.nn.softplus(a + SOFTPLUS_ONE) if self.cfg.use_softplus else jnp.exp(a)

    def _head(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.head(self.normed(h))

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

    def _features(self, x, context=None, context_mask=None, positions=None):
        """Teacher-forced transformer output for the N slots of permuted x, and permuted x."""
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
        h, _ = self.layers(h, rope=self.rope(positions, b, h.shape[1]), kv_mask=kv_mask)
        return h[:, h.shape[1] - n :], xp.astype(jnp.float32)

    def params(self, x, context=None, context_mask=None, positions=None):
        """Teacher-forced (a, mu, sigma) for every token of permuted x, plus the permuted x."""
        h, xp = self._features(x, context, context_mask, positions)
        a, mu = self._head(h)
        if self.sos is None:  # output t predicts token t+1; token 0 gets (0, 0) -> identity
            a = jnp.pad(a[:, :-1], ((0, 0), (1, 0), (0, 0)))
            mu = jnp.pad(mu[:, :-1], ((0, 0), (1, 0), (0, 0)))
        return a, mu, self.sigma(a), xp

    def forward(self, x, context=None, context_mask=None, positions=None):
        """x (B, N, D) -> (z (B, N, D) fp32, logdet (B,) = sum of log|dz/dx|)."""
        if self.cfg.affine_impl == "pallas":
            return self._forward_fused(x, context, context_mask, positions)
        _, mu, sigma, xp = self.params(x, context, context_mask, positions)
        z = (xp - mu) / sigma
        logdet = -jnp.sum(jnp.log(sigma), axis=(1, 2))
        return _permute(z, self.permutation), logdet

    def _forward_fused(self, x, context, context_mask, positions):
        """`forward` with the head, affine step and log-det in one Pallas kernel (the
        (B, N, 2D) head output never reaches memory). Shift variant: token 0 is the identity
        and slot t's output transforms token t+1."""
        h, xp = self._features(x, context, context_mask, positions)
        h, targets = (h, xp) if self.sos is not None else (h[:, :-1], xp[:, 1:])
        dtype = jnp.dtype(self.cfg.compute_dtype)
        z, sum_log_sigma, _ = flow_affine.affine_forward(
            self.normed(h),
            self.proj_out.kernel[...].astype(dtype),
            self.proj_out.bias[...],
            targets,
            soft_clip=self.cfg.soft_clip,
            use_softplus=self.cfg.use_softplus,
            impl="pallas",
        )
        if self.sos is None:
            z = jnp.concatenate([xp[:, :1], z], axis=1)
        return _permute(z, self.permutation), -sum_log_sigma

    # -- noise -> data --------------------------------------------------------------------------
    #
    # Decoding runs "steps" j = 0 .. M-1. Step j feeds one input token at sequence slot
    # prefix + j and produces x_j = mu_j + sigma_j * noise_j; the input of step j+1 is x_j.
    #   SOS:   M = N, input of step 0 = sos, noise = zp, tokens = x_0 .. x_{N-1}
    #   shift: M = N-1, input of step 0 = zp_0 (token 0 is the identity), noise = zp_1 ..
    # `_decode_chunk` runs K consecutive steps in one transformer call at a FIXED cache index:
    # K = 1 is the sequential decoder (`inverse`); K > 1 is one block-Jacobi iteration
    # (`pretzel_jax.flow.jacobi`), re-run at the same index until the chunk converges.

    def _decode_setup(
        self,
        z,
        context=None,
        context_mask=None,
        positions=None,
        *,
        uncond_context=None,
        uncond_context_mask=None,
        guidance_rule: str = "product",
        steps_capacity: int | None = None,
    ) -> DecodeSetup:
        """Everything a decoder needs before its first step: permuted noise, the CFG-doubled
        context prefix prefilled into a fresh KV cache (size prefix + `steps_capacity`, default
        N; a larger capacity pads the rotary table with its last row), the first input."""
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
        capacity = n if steps_capacity is None else max(steps_capacity, n)
        cache = self.layers.init_cache(bb, lc + capacity, jnp.dtype(self.cfg.compute_dtype))
        rope = self.rope(positions, bb, lc + n)
        if c is not None:  # prefill the context prefix once
            rope_c = None if rope is None else (rope[0][:, :lc], rope[1][:, :lc])
            _, cache = self.layers(c, rope=rope_c, kv_mask=cmask, cache=cache)
        if rope is not None and capacity > n:  # slots past the sequence only hold padding
            rope = tuple(jnp.pad(r, ((0, 0), (0, capacity - n), (0, 0)), mode="edge") for r in rope)
        if self.sos is not None:
            first = jnp.broadcast_to(self.sos[...].astype(jnp.float32), (b, d))
            noise = zp
        else:  # token 0 passes through unchanged
            first, noise = zp[:, 0], zp[:, 1:]
        cache = self.layers.unstack_cache(cache)
        return DecodeSetup(zp, noise, first, cache, rope, lc, b, guided, self.layers.unstacked())

    def _decode_params(self, h, batch: int, guided: bool, guidance, guidance_rule: str):
        """Transformer output of decode steps -> (mu, sigma), fp32, CFG-mixed when guided (the
        rows of h are [cond; uncond]; the result has the `batch` rows of the cond half). The one
        place where head, sigma and guidance meet while decoding (sequential and Jacobi alike):
        a fused head kernel replaces this method."""
        a, mu = self._head(h)
        if not guided:
            return mu, self.sigma(a)
        if guidance_rule == "product":
            return cfg_rules.gaussian_product(
                mu[:batch], self.sigma(a[:batch]), mu[batch:], self.sigma(a[batch:]), guidance
            )
        a_g, mu_g = cfg_rules.additive(a[:batch], mu[:batch], a[batch:], mu[batch:], guidance)
        return mu_g, self.sigma(a_g)

    def _decode_chunk(
        self, setup: DecodeSetup, inputs, cache, step, noise, *, guidance, guidance_rule: str
    ):
        """Decode steps step .. step+K-1 in one transformer call.

        inputs (B, K, D) fp32: the input tokens of those steps; noise (B, K, D) their noise;
        step: traced int. The K keys/values are written at cache slots prefix+step .. (the
        cache's write index is SET to prefix+step, so a rejected Jacobi iterate is overwritten
        by the next call), and query k attends to the cache up to its own slot (causal within
        the chunk). Returns (x = mu + sigma * noise, mu, sigma, cache), all (B, K, D) fp32 for
        the conditional half; under CFG both halves of the doubled batch take the same inputs.
        """
        k = inputs.shape[1]
        slot = setup.prefix + step
        if setup.guided:
            inputs = jnp.concatenate([inputs, inputs], axis=0)
        rope = setup.rope
        if rope is not None:
            rope = tuple(jax.lax.dynamic_slice_in_dim(r, slot, k, axis=1) for r in rope)
        cache = tuple(c.at(slot) for c in cache)
        h = self.proj_in(inputs.astype(jnp.dtype(self.cfg.compute_dtype)))
        h, cache = self.layers(h, rope=rope, cache=cache, layers=setup.layers)
        if setup.guided and guidance_rule == "product" and self.cfg.affine_impl == "pallas":
            a, mu = self._head(h)  # the CFG mix and the affine step in one kernel
            flat = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731  [cond; uncond] rows
            x, mu, sigma = flow_affine.guided_sample_step(
                flat(a),
                flat(mu),
                flat(noise),
                guidance,
                use_softplus=self.cfg.use_softplus,
                impl="pallas",
            )
            return *(v.reshape(noise.shape) for v in (x, mu, sigma)), cache
        mu, sigma = self._decode_params(h, setup.batch, setup.guided, guidance, guidance_rule)
        return mu + sigma * noise, mu, sigma, cache

    def _decode_finish(self, setup: DecodeSetup, xs, mus, sigmas):
        """Step outputs (B, M, D) -> tokens in data order, and (mu, sigma) per token in the
        block's permuted order (token 0 of the shift variant: mu 0, sigma 1)."""
        if self.sos is None:
            xs = jnp.concatenate([setup.zp[:, :1], xs], axis=1)
            mus = jnp.pad(mus, ((0, 0), (1, 0), (0, 0)))
            sigmas = jnp.pad(sigmas, ((0, 0), (1, 0), (0, 0)), constant_values=1.0)
        return _permute(xs, self.permutation), mus, sigmas

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
        setup = self._decode_setup(
            z,
            context,
            context_mask,
            positions,
            uncond_context=uncond_context,
            uncond_context_mask=uncond_context_mask,
            guidance_rule=guidance_rule,
        )

        def step(carry, j):
            prev, cache = carry
            noise = jax.lax.dynamic_slice_in_dim(setup.noise, j, 1, axis=1)
            x, mu, sigma, cache = self._decode_chunk(
                setup,
                prev[:, None],
                cache,
                j,
                noise,
                guidance=guidance,
                guidance_rule=guidance_rule,
            )
            return (x[:, 0], cache), (x[:, 0], mu[:, 0], sigma[:, 0])

        steps = jnp.arange(setup.noise.shape[1])
        _, outs = jax.lax.scan(step, (setup.first, setup.cache), steps)
        x, mus, sigmas = self._decode_finish(setup, *(jnp.moveaxis(v, 0, 1) for v in outs))
        return (x, (mus, sigmas)) if return_params else x
