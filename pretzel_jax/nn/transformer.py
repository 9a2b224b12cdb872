"""Pre-norm Transformer layers, stacked and run with `lax.scan` (compile time flat in depth)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.nn.attention import Attention, KVCache
from pretzel_jax.nn.layers import MLP, make_norm
from pretzel_jax.nn.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    dim: int
    heads: int
    head_dim: int
    mlp_hidden: int
    kv_heads: int | None = None
    mlp_kind: str = "gelu"
    norm: str = "layer_norm"
    norm_eps: float = 1e-5
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    rope_interleaved: bool = False
    remat: str = "none"
    # Unroll the layer scan: faster steps at toy depth on CPU (no per-layer stacking of
    # activations), compile time growing with depth.
    unroll_layers: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {self.remat!r}; use one of {list(REMAT_POLICIES)}"
            )


@jax.custom_vjp
def _gradient_fence(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is materialised: in an unrolled stack XLA:CPU otherwise fuses
    the residual stream's whole backward chain (every later layer's norm backward) into each
    consumer, a weight gradient's transposing copy included, so the work grows with depth
    squared (a width-256 flow's step: 1.29x the scanned one's without the fence, 0.87x with it).
    A conditional is the fence because XLA:CPU drops optimisation barriers."""
    return x


def _fence_fwd(x):
    return x, None


def _fence_bwd(_, g):
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda v: v, lambda v: v + 0, g),)


_gradient_fence.defvjp(_fence_fwd, _fence_bwd)


def _per_layer(tree, num_layers: int) -> tuple:
    """A tree stacked over layers (leading axis) as one tree per layer."""
    return tuple(jax.tree.map(lambda a, i=i: a[i], tree) for i in range(num_layers))


def _through_view(layer, h, stacked: KVCache, i, kw):
    """Runs one layer on its view of the stacked cache (written in place) -> (h, stacked)."""
    h, view = layer(h, cache=stacked.replace(index=stacked.index[i], layer=i), **kw)
    return h, view.replace(index=stacked.index.at[i].set(view.index), layer=None)


class TransformerLayer(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(
            param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype)
        )
        self.attn_norm = make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(
            cfg.dim,
            cfg.heads,
            cfg.head_dim,
            kv_heads=cfg.kv_heads,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            rope_interleaved=cfg.rope_interleaved,
            rngs=rngs,
            **kw,
        )
        self.mlp_norm = make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(
            cfg.dim, cfg.mlp_hidden, kind=cfg.mlp_kind, use_bias=cfg.mlp_bias, rngs=rngs, **kw
        )

    def __call__(self, x, *, rope=None, mask=None, kv_mask=None, cache=None):
        h, cache = self.attn(self.attn_norm(x), rope=rope, mask=mask, kv_mask=kv_mask, cache=cache)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return constrain(x, ("batch", "length", "embed")), cache


class LayerStack(nnx.Module):
    """`num_layers` TransformerLayers with parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg: TransformerConfig, num_layers: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return TransformerLayer(cfg, rngs=rngs)

        self.layers = make(rngs)
        self.num_layers = num_layers
        self.cfg = cfg

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        one = KVCache.init(
            batch, size, self.cfg.kv_heads or self.cfg.heads, self.cfg.head_dim, dtype
        )
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers, *a.shape)), one)

    def unstacked(self) -> tuple:
        """Each layer's parameters as separate arrays, for `__call__(..., layers=)`. Take them
        once before a decode loop: inside one, XLA:CPU copies every layer's weights out of the
        stacked arrays at every step (22% of a width-256 flow's sampling time)."""
        return _per_layer(nnx.split(self.layers)[1], self.num_layers)

    def unstack_cache(self, cache: KVCache) -> tuple[KVCache, ...]:
        """A stacked cache as one cache per layer, each with buffers of its own, for
        `__call__(..., layers=, cache=)`. Attention reads such a cache whole, in place, where it
        reads a stacked one in filled blocks, each a copy on XLA:CPU: the better trade when the
        capacity is about the sequence (the flow decoders')."""
        return _per_layer(cache.replace(layer=None), self.num_layers)

    def __call__(
        self,
        x,
        *,
        rope=None,
        mask=None,
        kv_mask=None,
        cache: KVCache | None = None,
        collect: bool = False,
        layers: tuple | None = None,
    ):
        """Runs every layer. `cache` is the stacked per-layer cache (from init_cache) or None.
        `layers`: this stack's `unstacked()` parameters, run in a Python loop (decoding only);
        `cache` is then stacked or `unstack_cache()`'s per-layer tuple, returned in kind.
        -> (x, cache), or with `collect` (x, cache, every layer's output stacked (layers, ...))."""
        graphdef, state = nnx.split(self.layers)
        kw = dict(rope=rope, mask=mask, kv_mask=kv_mask)
        if layers is not None:
            if cache is None or len(layers) != self.num_layers:
                raise ValueError("`layers` (this stack's unstacked()) is for cached decoding")
            hs, own = [], isinstance(cache, tuple)
            caches = list(cache) if own else []
            for i, layer_state in enumerate(layers):
                layer = nnx.merge(graphdef, layer_state)
                if own:
                    x, caches[i] = layer(x, cache=caches[i], **kw)
                else:
                    x, cache = _through_view(layer, x, cache, jnp.asarray(i), kw)
                hs.append(x)
            cache = tuple(caches) if own else cache
            return (x, cache, jnp.stack(hs)) if collect else (x, cache)
        policy = REMAT_POLICIES[self.cfg.remat]
        unroll = self.cfg.unroll_layers

        if cache is None:

            def body(h, layer_state):
                if unroll:  # a scanned stack's loop boundary fences it already
                    h = _gradient_fence(h)
                h, _ = nnx.merge(graphdef, layer_state)(h, **kw)
                return h, h if collect else None

            if policy is not None:
                body = jax.checkpoint(body, policy=policy)
            x, hs = jax.lax.scan(body, x, state, unroll=unroll)
            return (x, None, hs) if collect else (x, None)

        # The stacked cache rides in the carry and each layer writes its view of it in place
        # (as scan inputs and outputs, every step would copy every layer's whole cache).
        def cached_body(carry, xs):
            h, stacked = carry
            i, layer_state = xs
            h, stacked = _through_view(nnx.merge(graphdef, layer_state), h, stacked, i, kw)
            return (h, stacked), h if collect else None

        steps = (jnp.arange(self.num_layers), state)
        (x, cache), hs = jax.lax.scan(cached_body, (x, cache), steps, unroll=unroll)
        return (x, cache, hs) if collect else (x, cache)
