"""Multi-head / grouped-query attention with an explicit fixed-size KV cache.

Masks are built from slot indices, so the same code serves training (no cache), one-token decoding
and chunked decoding (a chunk of T tokens written at the cache's index) inside `jit`:
- causal: key slot <= query slot;
- segments (packed documents): query and key share a segment id;
- prefix: keys in slots < prefix_len[b] are visible to every query (prefix-LM);
- key padding: `kv_mask` (B, S) marks valid keys; the cache stores it with k and v, so a padded
  context stays masked during decoding.
A fixed cache size keeps decode-step shapes static: one compile. A cached call attends only the
cache's filled blocks (`cached_attention`: a while loop over key blocks with an online softmax),
so a step's cost follows the filled length, not the capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pretzel_jax.nn.layers import Dense
from pretzel_jax.nn.rope import apply_rope
from pretzel_jax.nn.sharding import constrain

NEG_INF = -1e30


@struct.dataclass
class KVCache:
    """k, v: (B, kv_heads, S, head_dim); kv_mask: (B, S) valid keys; index: next slot to write.
    Heads come before slots so that a block of slots is contiguous per head: attention's dots
    read it as it lies (slots-major, every block read was a transposing copy on XLA:CPU, 40% of
    a width-256 flow's sampling time).

    A layer stack keeps one cache per layer stacked in front ((L, B, S, ...), index (L,)) and
    hands each layer a view: the stacked buffers, that layer's index and `layer` = its position.
    Writes and reads of a view address the stacked buffers in place, so a decode step moves
    only the slots it writes and reads, never a whole layer's cache."""

    k: jax.Array
    v: jax.Array
    kv_mask: jax.Array
    index: jax.Array
    layer: jax.Array | None = None

    @classmethod
    def init(cls, batch: int, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        zeros = jnp.zeros((batch, kv_heads, size, head_dim), dtype)
        return cls(zeros, zeros, jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))

    @property
    def size(self) -> int:
        return self.kv_mask.shape[-1]  # (B, S), or stacked over layers in front

    @property
    def overflowed(self) -> jax.Array:
        """Whether a write ran past the last slot (bool, traceable). XLA clamps such a write onto
        the last T slots, so callers that size the cache themselves check this flag."""
        return jnp.any(self.index > self.size)

    def write(self, k: jax.Array, v: jax.Array, kv_mask: jax.Array) -> KVCache:
        """Write T new entries, k/v (B, T, kv_heads, head_dim), at `index` (a failed Jacobi
        iterate is simply overwritten later by writing at the same index again). The index is not
        clamped: see `overflowed`."""
        i = self.index
        o = jnp.zeros((), i.dtype)

        def put(buf, new, start):
            if self.layer is not None:  # a view: this layer's slab of the stacked buffer
                new, start = new[None], (self.layer.astype(i.dtype), *start)
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)

        return self.replace(
            k=put(self.k, k.swapaxes(1, 2), (o, o, i, o)),
            v=put(self.v, v.swapaxes(1, 2), (o, o, i, o)),
            kv_mask=put(self.kv_mask, kv_mask, (o, i)),
            index=i + k.shape[1],
        )

    def slots(self, start, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """k, v (B, kv_heads, length, head_dim) and kv_mask (B, length) of slots
        [start, start + length) of this (layer's) cache."""

        def take(buf, axis):
            if self.layer is None:
                return jax.lax.dynamic_slice_in_dim(buf, start, length, axis=axis)
            buf = jax.lax.dynamic_slice_in_dim(buf, self.layer, 1, axis=0)
            return jax.lax.dynamic_slice_in_dim(buf, start, length, axis=axis + 1)[0]

        return take(self.k, 2), take(self.v, 2), take(self.kv_mask, 1)

    def at(self, index) -> KVCache:
        """The same buffers with the write index moved (e.g. rolled back for a Jacobi retry);
        a scalar index moves every layer of a stacked cache."""
        return self.replace(index=jnp.broadcast_to(jnp.asarray(index, jnp.int32), self.index.shape))


def make_mask(
    q_slots: jax.Array,
    kv_slots: jax.Array,
    *,
    causal: bool = True,
    kv_mask: jax.Array | None = None,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    prefix_len: jax.Array | None = None,
    q_branches: jax.Array | None = None,
    kv_branches: jax.Array | None = None,
) -> jax.Array:
    """Boolean (B, T, S) mask: True where query t may attend to key s. Slots are (B, T)/(B, S)
    or broadcastable (T,)/(S,). Branches (B, T)/(B, S): a key of branch k > 0 is seen only by
    queries of branch k; branch 0 by all."""
    q = jnp.atleast_2d(q_slots)[:, :, None]
    k = jnp.atleast_2d(kv_slots)[:, None, :]
    mask = k <= q if causal else jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
    if prefix_len is not None:
        mask = mask | (k < prefix_len[:, None, None])
    if q_segments is not None and kv_segments is not None:
        mask = mask & (q_segments[:, :, None] == kv_segments[:, None, :])
    if q_branches is not None and kv_branches is not None:
        kb = kv_branches[:, None, :]
        mask = mask & ((kb == 0) | (kb == q_branches[:, :, None]))
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, :]
    return mask


def packed_mask(
    segment_ids: jax.Array, branch_ids: jax.Array | None = None, kv_mask: jax.Array | None = None
) -> jax.Array:
    """The (B, S, S) causal mask of packed rows: a token attends inside its own document
    (`segment_ids`, 0 = padding) and, with `branch_ids`, to branch 0 and its own branch."""
    slots = jnp.arange(segment_ids.shape[1])
    return make_mask(
        slots,
        slots,
        kv_mask=segment_ids > 0 if kv_mask is None else kv_mask,
        q_segments=segment_ids,
        kv_segments=segment_ids,
        q_branches=branch_ids,
        kv_branches=branch_ids,
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    *,
    causal: bool = False,
) -> jax.Array:
    """q (B,T,H,D), k/v (B,S,KVH,D), mask (B,T,S) -> (B,T,H,D). Softmax in fp32; a query whose
    keys are all masked returns zeros rather than NaN.

    `causal` (self-attention, T == S): a query also sees no key after its own slot, whatever
    `mask` allows. Queries then go in blocks (`causal_block`), each against the keys up to its
    last slot: the blocks above the diagonal are never computed."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    if causal:
        if k.shape[1] != t:
            raise ValueError(f"causal attention is self-attention: {t} queries, {k.shape[1]} keys")
        mask = mask & jnp.tril(jnp.ones((t, t), bool))
    block = causal_block(t) if causal else None
    if block is None:
        out = _attention(q, k, v, mask, scale)
    else:
        parts = []
        for i in range(0, t, block):
            end = i + block
            parts.append(
                _attention(q[:, i:end], k[:, :end], v[:, :end], mask[:, i:end, :end], scale)
            )
        out = jnp.concatenate(parts, axis=1)
    # NEG_INF is finite, so a query with no visible key gets the mean of v; zero it on the
    # (B,T) output rather than the (B,H,T,S) probabilities (a masked key's prob is exactly 0).
    seen = jnp.any(mask, axis=-1)[:, :, None, None, None]
    return jnp.where(seen, out, 0).reshape(b, t, h, d)


def causal_block(length: int) -> int | None:
    """Query block of causal self-attention over `length` slots: 128, else 64, whichever
    divides it at least twice; None (one block) otherwise. On the 2-core CPU, blocks of 128 made
    a width-256 flow's train step 2.1x faster at 1024 tokens and 1.35x at 256 (README,
    Benchmarks 10)."""
    for size in (128, 64):
        if length % size == 0 and length >= 2 * size:
            return size
    return None


def _attention(q, k, v, mask, scale):
    """Grouped attention core: q (B,T,KVH,G,D), k/v (B,S,KVH,D) -> (B,T,KVH,G,D). Plain autodiff
    (a custom VJP saved ~3% more but would refuse forward mode, which the log-det tests use)."""
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def decode_block(size: int, largest: int = 256) -> int | None:
    """The key-block size `cached_attention` uses for a cache of `size` slots: its largest
    divisor in [32, largest] below `size`, or None (small or awkward sizes: attend it whole)."""
    return next((b for b in range(min(largest, size // 2), 31, -1) if size % b == 0), None)


def cached_attention(
    q: jax.Array,
    cache: KVCache,
    q_slots: jax.Array,
    scale: float,
    block: int,
    *,
    causal: bool = True,
    mask: jax.Array | None = None,
) -> jax.Array:
    """q (B, T, H, D) over the keys of `cache` (after its write) in blocks of `block` slots,
    only as many as hold keys (ceil(index / block), a while loop), with an online softmax in
    fp32: what `dot_product_attention` gives over the whole cache, up to rounding. `mask`
    (B, T, S) replaces the causal-by-slot rule; the cache's kv_mask always applies."""
    b, t, h, d = q.shape
    kvh = cache.k.shape[-3]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    zero = jnp.zeros((), jnp.int32)

    def body(carry):
        i, m, total, acc = carry
        start = i * block
        k, v, seen = cache.slots(start, block)
        seen = seen[:, None, :]
        if mask is None:
            seen = seen & make_mask(q_slots, start + jnp.arange(block), causal=causal)
        else:
            seen = seen & jax.lax.dynamic_slice_in_dim(mask, start, block, axis=2)
        seen = seen[:, None, None]  # (B, 1, 1, T, blk)
        logits = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
        logits = jnp.where(seen, logits * scale, NEG_INF)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.where(seen, jnp.exp(logits - m_new[..., None]), 0.0)
        rescale = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v)
        acc = acc * rescale[..., None] + pv.astype(jnp.float32)
        return i + 1, m_new, total * rescale + p.sum(-1), acc

    blocks = (jnp.max(cache.index) + block - 1) // block
    shape = (b, kvh, h // kvh, t)
    init = (zero, jnp.full(shape, NEG_INF), jnp.zeros(shape), jnp.zeros((*shape, d)))
    _, _, total, acc = jax.lax.while_loop(lambda c: c[0] < blocks, body, init)
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


class Attention(nnx.Module):
    """Self-attention with separate q/k/v projections (GQA when kv_heads < heads)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        kv_heads: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        rope_interleaved: bool = False,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
    ):
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        kw = dict(rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.q = Dense(dim, heads * head_dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
        self.k = Dense(
            dim, kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw
        )
        self.v = Dense(
            dim, kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw
        )
        self.o = Dense(heads * head_dim, dim, axes=("heads", "embed"), use_bias=out_bias, **kw)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_interleaved = rope_interleaved

    def __call__(
        self,
        x: jax.Array,
        *,
        rope: tuple[jax.Array, jax.Array] | None = None,
        mask: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        causal: bool = True,
        scale: float | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x (B, T, dim). Without a cache, `mask` (B, T, T) defaults to kv_mask, and `causal`
        (the default) hides every later slot whatever `mask` allows. With a cache, the T tokens
        are written at cache.index and attend to the cache (causal by slot, unless `mask`
        (B, T, S) replaces that rule); `kv_mask` (B, T) marks which of the new tokens are valid
        keys."""
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        if rope is not None:
            q = apply_rope(q, *rope, interleaved=self.rope_interleaved)
            k = apply_rope(k, *rope, interleaved=self.rope_interleaved)
        new_valid = jnp.ones((b, t), bool) if kv_mask is None else kv_mask
        scale = scale or self.head_dim**-0.5
        if cache is not None:
            q_slots = cache.index + jnp.arange(t)
            cache = cache.write(k, v, new_valid)
            # A view of a stacked cache is read in its filled blocks; a cache with buffers of its
            # own (LayerStack.unstack_cache) is read whole, in place: no slice, so no copy.
            block = decode_block(cache.size) if cache.layer is not None else cache.size
            if block is not None:
                out = cached_attention(q, cache, q_slots, scale, block, causal=causal, mask=mask)
                return self.o(out.reshape(b, t, self.heads * self.head_dim)), cache
            k, v, valid = cache.slots(0, cache.size)
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
            if mask is None:
                mask = make_mask(q_slots, jnp.arange(cache.size), causal=causal)
            mask = mask & valid[:, None, :]
        elif mask is None:  # dot_product_attention applies `causal`
            slots = jnp.arange(t)
            mask = make_mask(slots, slots, causal=False, kv_mask=new_valid)
        out = dot_product_attention(q, k, v, mask, scale, causal=causal and cache is None)
        return self.o(out.reshape(b, t, self.heads * self.head_dim)), cache
