import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax.nn import (
    Attention,
    KVCache,
    LayerStack,
    RMSNorm,
    TransformerConfig,
    apply_rope,
    dot_product_attention,
    gelu,
    make_mask,
    packed_mask,
    rope_1d,
    rope_angles,
    rope_mrope,
    rope_sectioned,
)
from pretzel_jax.nn.attention import cached_attention, causal_block, decode_block
from pretzel_jax.nn.sharding import DEFAULT_RULES, logical_to_spec

CFG = TransformerConfig(dim=32, heads=4, head_dim=8, kv_heads=2, mlp_hidden=64)


def _rope(b, length, head_dim=8, offset=0):
    pos = jnp.broadcast_to(jnp.arange(length) + offset, (b, length))
    return rope_angles(pos, *rope_1d(head_dim))


def test_gqa_equals_mha_with_repeated_kv_heads():
    q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
    k = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))
    v = jax.random.normal(jax.random.key(2), (2, 5, 2, 8))
    mask = make_mask(jnp.arange(5), jnp.arange(5))
    mask = jnp.broadcast_to(mask, (2, 5, 5))
    gqa = dot_product_attention(q, k, v, mask, 8**-0.5)
    mha = dot_product_attention(
        q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask, 8**-0.5
    )
    np.testing.assert_allclose(gqa, mha, atol=1e-6)
    # A query that sees no key (a padding row) gets zeros, not the mean of v or NaN.
    blind = dot_product_attention(q, k, v, mask.at[1, 2].set(False), 8**-0.5)
    np.testing.assert_array_equal(blind[1, 2], 0.0)
    np.testing.assert_allclose(blind[0], gqa[0], atol=1e-6)


def test_masks_causal_segments_prefix_and_padding():
    slots = jnp.arange(4)[None]
    seg = jnp.array([[0, 0, 1, 1]])
    m = make_mask(slots, slots, q_segments=seg, kv_segments=seg)
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(m[0], expected)
    m = make_mask(slots, slots, prefix_len=jnp.array([2]))
    assert bool(m[0, 0, 1]) and not bool(m[0, 1, 2])  # prefix is bidirectional, rest causal
    m = make_mask(slots, slots, kv_mask=jnp.array([[True, False, True, True]]))
    assert not bool(m[0, 3, 1]) and bool(m[0, 3, 2])


def test_packed_documents_do_not_see_each_other():
    attn = Attention(16, 2, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 6, 16))
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    mask = make_mask(jnp.arange(6), jnp.arange(6), q_segments=seg, kv_segments=seg)
    packed, _ = attn(x, mask=mask)
    alone, _ = attn(x[:, 3:])
    np.testing.assert_allclose(packed[:, 3:], alone, atol=1e-5)


@pytest.mark.parametrize("path", ["scan", "unstacked", "own caches"])
@pytest.mark.parametrize("size", [16, 64], ids=["whole", "blocks"])  # 64: two 32-slot blocks
@pytest.mark.parametrize("chunks", [(10,), (1,) * 10, (4, 1, 3, 2)])
def test_cached_decoding_equals_full_forward(chunks, size, path):
    """The scanned stack, its unstacked() layers over the stacked cache (read in blocks) and
    over unstack_cache()'s per-layer caches (read whole) all decode what the full forward gives."""
    stack = LayerStack(CFG, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    cos, sin = _rope(2, 10)
    full, _ = stack(x, rope=(cos, sin))
    cache = stack.init_cache(2, size)
    layers = None if path == "scan" else stack.unstacked()
    if path == "own caches":
        cache = stack.unstack_cache(cache)
    step = jax.jit(lambda h, r, c: stack(h, rope=r, cache=c, layers=layers))
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        y, cache = step(x[:, sl], (cos[:, sl], sin[:, sl]), cache)
        outs.append(y)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    indices = [c.index for c in cache] if path == "own caches" else cache.index
    np.testing.assert_array_equal(indices, [10, 10])


def _filled_cache(size: int, index: int) -> KVCache:
    keys = jax.random.split(jax.random.key(3), 3)
    k = jax.random.normal(keys[0], (2, size, 2, 8))
    v = jax.random.normal(keys[1], (2, size, 2, 8))
    valid = (jax.random.uniform(keys[2], (2, size)) > 0.2) & (jnp.arange(size) < index)
    # KVCache keeps heads before slots; the reference attention takes slots first.
    return KVCache(k.swapaxes(1, 2), v.swapaxes(1, 2), valid, jnp.asarray(index, jnp.int32))


def _slots_major(cache: KVCache):
    return cache.k.swapaxes(1, 2), cache.v.swapaxes(1, 2)


def test_cached_attention_equals_the_whole_cache_and_reads_only_filled_blocks():
    assert decode_block(16) is None and decode_block(1040) == 208 and decode_block(4096) == 256
    q = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
    cache = _filled_cache(256, 150)  # blocks of 128: two hold keys
    slots = 147 + jnp.arange(3)
    whole = make_mask(slots, jnp.arange(256)) & cache.kv_mask[:, None, :]
    ref = dot_product_attention(q, *_slots_major(cache), whole, 0.3)
    got = jax.jit(cached_attention, static_argnums=(3, 4))(q, cache, slots, 0.3, 128)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    # A given mask replaces the causal rule; a query that sees no key gets zeros.
    mask = jax.random.uniform(jax.random.key(4), (2, 3, 256)) > 0.5
    mask = mask.at[1, 2].set(False)
    ref = dot_product_attention(q, *_slots_major(cache), mask & cache.kv_mask[:, None, :], 0.3)
    got = cached_attention(q, cache, slots, 0.3, 128, mask=mask)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    np.testing.assert_array_equal(got[1, 2], 0.0)
    # Slots past the filled blocks are never read (NaN there would poison the whole-cache sum).
    cache = _filled_cache(256, 100)
    cache = cache.replace(v=cache.v.at[:, :, 128:].set(jnp.nan))
    assert np.isfinite(cached_attention(q, cache, 97 + jnp.arange(3), 0.3, 128)).all()
    whole = make_mask(97 + jnp.arange(3), jnp.arange(256)) & cache.kv_mask[:, None, :]
    assert not np.isfinite(dot_product_attention(q, *_slots_major(cache), whole, 0.3)).all()


def test_rolled_back_cache_index_overwrites_a_failed_chunk():
    stack = LayerStack(CFG, 1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 6, 32))
    cos, sin = _rope(1, 6)
    ref, _ = stack(x, rope=(cos, sin))
    cache = stack.init_cache(1, 8)
    _, cache = stack(x[:, :3], rope=(cos[:, :3], sin[:, :3]), cache=cache)
    _, bad = stack(x[:, 3:] + 5.0, rope=(cos[:, 3:], sin[:, 3:]), cache=cache)  # wrong guess
    y, _ = stack(x[:, 3:], rope=(cos[:, 3:], sin[:, 3:]), cache=bad.at(jnp.full((1,), 3)))
    np.testing.assert_allclose(y, ref[:, 3:], atol=1e-5)


def test_a_write_past_the_cache_is_flagged():
    stack = LayerStack(CFG, 1, rngs=nnx.Rngs(0))  # caches stacked over layers
    x = jax.random.normal(jax.random.key(1), (1, 6, 32))
    cos, sin = _rope(1, 6)
    cache = stack.init_cache(1, 8)
    assert cache.size == 8
    step = jax.jit(lambda x, c: stack(x, rope=(cos[:, :3], sin[:, :3]), cache=c)[1])
    cache = step(x[:, :3], cache)
    cache = step(x[:, 3:], cache)  # slots 3-5 of 8
    assert not cache.overflowed
    assert jax.jit(lambda c: step(x[:, :3], c).overflowed)(cache)  # 9 > 8: clamped by XLA


def test_rope_is_relative():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    for interleaved in (True, False):
        dots = []
        for offset in (0, 7):
            cq = _rope(1, 1, offset=offset + 3)
            ck = _rope(1, 1, offset=offset)
            rq = apply_rope(q, *cq, interleaved=interleaved)
            rk = apply_rope(k, *ck, interleaved=interleaved)
            dots.append(float(jnp.sum(rq * rk)))
        assert dots[0] == pytest.approx(dots[1], rel=1e-5)


def test_rope_rotates_interleaved_pairs_or_half_split_pairs():
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 2, 8)))
    cos, sin = (np.asarray(t) for t in _rope(2, 3, offset=5))
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    pairs = {True: (x[..., 0::2], x[..., 1::2]), False: (x[..., :4], x[..., 4:])}
    for interleaved, (x1, x2) in pairs.items():
        out = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved=interleaved))
        o1, o2 = (out[..., 0::2], out[..., 1::2]) if interleaved else (out[..., :4], out[..., 4:])
        np.testing.assert_allclose(o1, x1 * c - x2 * s, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(o2, x2 * c + x1 * s, rtol=1e-6, atol=1e-6)


def test_mrope_with_equal_axes_is_1d_rope_and_sections_validate():
    freqs, axes = rope_mrope(16, (2, 3, 3))
    np.testing.assert_array_equal(axes, [0, 0, 1, 1, 1, 2, 2, 2])
    pos = jnp.broadcast_to(jnp.arange(5), (1, 5))
    c3, s3 = rope_angles(jnp.stack([pos] * 3, -1), freqs, axes)
    c1, s1 = rope_angles(pos, *rope_1d(16))
    np.testing.assert_allclose(c3, c1, atol=1e-6)
    np.testing.assert_allclose(s3, s1, atol=1e-6)
    with pytest.raises(ValueError, match="sum to head_dim/2"):
        rope_mrope(16, (2, 2, 2))
    freqs, axes = rope_sectioned((4, 4, 8))  # STARFlow head_dim 32 with text: row, col, text
    np.testing.assert_allclose(freqs[:4], [1, 0.1, 0.01, 0.001], rtol=1e-6)
    np.testing.assert_allclose(freqs[8:10], [1, 10000 ** (-1 / 8)], rtol=1e-6)


def test_rmsnorm_unit_offset_starts_as_plain_normalisation():
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 5
    y = RMSNorm(8, unit_offset=True)(x)
    np.testing.assert_allclose(y, x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6), rtol=1e-5)


@pytest.mark.parametrize("change", [{"remat": "full"}, {"remat": "dots"}, {"unroll_layers": True}])
def test_remat_and_unrolling_change_nothing_but_memory_and_speed(change):
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    plain = LayerStack(CFG, 2, rngs=nnx.Rngs(0))
    remat = LayerStack(TransformerConfig(**{**CFG.__dict__, **change}), 2, rngs=nnx.Rngs(0))

    def loss(stack):
        return jnp.sum(stack(x)[0] ** 2)

    g1 = nnx.grad(loss)(plain)
    g2 = nnx.grad(loss)(remat)
    # fp32 summation order differs under remat: compare relative to the gradients' scale
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6 * scale)


def test_unrolled_stacks_fence_each_layers_cotangent():
    """The unrolled backward gets one conditional per layer (the fence against XLA:CPU fusing
    the whole residual chain into every consumer); the scanned one none."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    for unroll, fences in ((True, 3), (False, 0)):
        stack = LayerStack(
            TransformerConfig(**{**CFG.__dict__, "unroll_layers": unroll}), 3, rngs=nnx.Rngs(0)
        )
        graphdef, state = nnx.split(stack)

        def loss(state, x, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

        hlo = jax.jit(jax.grad(loss, (0, 1))).lower(state, x).compile().as_text()
        assert hlo.count(" conditional(") == fences


@pytest.mark.parametrize("length", [40, 192, 256])
def test_causal_blocks_equal_full_matrix_attention(length):
    """Causal attention (in query blocks from 128 slots, key blocks above the diagonal skipped)
    equals full-matrix attention under the causal packed mask, values and gradients, on rows
    with padding, a document boundary inside a block and grouped heads, when it is given only
    the documents' (non-causal) mask: `causal` adds the causal rule itself."""
    b, h, kvh, d = 2, 4, 2, 8
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, length, h, d))
    k = jax.random.normal(keys[1], (b, length, kvh, d))
    v = jax.random.normal(keys[2], (b, length, kvh, d))
    g = jax.random.normal(keys[3], (b, length, h, d))
    cut = length // 2 + 5
    seg = jnp.stack(
        [
            jnp.where(jnp.arange(length) < cut, 1, 2).at[-3:].set(0),
            jnp.ones((length,), jnp.int32),
        ]
    )
    mask = packed_mask(seg)
    documents = make_mask(
        jnp.arange(length),
        jnp.arange(length),
        causal=False,
        q_segments=seg,
        kv_segments=seg,
        kv_mask=seg > 0,
    )
    assert not bool(jnp.all(documents == mask))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * g)

    blocked = functools.partial(dot_product_attention, mask=documents, scale=0.3, causal=True)
    plain = functools.partial(dot_product_attention, mask=mask, scale=0.3)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, blocked), (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, plain), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, w in zip(got[1], want[1]):
        np.testing.assert_allclose(a, w, atol=2e-5 * float(jnp.abs(w).max()))
    assert causal_block(length) == {40: None, 192: 64, 256: 128}[length]


def test_every_parameter_has_logical_axes_known_to_the_rules():
    stack = LayerStack(CFG, 2, rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == var.ndim, path
            assert axes[0] == "layers", path
            logical_to_spec(axes, DEFAULT_RULES)  # raises on an unknown name


def test_gelu_is_the_exact_erf_gelu():
    """nn.gelu (torch's erf formula) against the erfc form of jax.nn.gelu and against
    float64: rounding apart, both exact; the tanh approximation is not."""
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    truth = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.tolist()])
    ours = np.asarray(gelu(x), np.float64)
    np.testing.assert_allclose(ours, np.asarray(jax.nn.gelu(x, approximate=False)), atol=2e-6)
    np.testing.assert_allclose(ours, truth, atol=2e-6)
    assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - truth).max() > 1e-4
    g = jax.vmap(jax.grad(gelu))(x)
    g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=2e-6)
