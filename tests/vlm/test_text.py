"""TextDecoder vs transformers' Qwen2ForCausalLM (tiny, random, fp32): plain, left-padded and
cached decoding. Weights reach the decoder through the production converter (hf_tiny.converted)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax.nn import rope_1d, rope_angles, rope_mrope
from pretzel_jax.vlm.text import TextDecoder
from tests.vlm import hf_tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(tied, seed) -> (transformers Qwen2ForCausalLM, our TextDecoder of the same weights,
    read from its saved folder by the production converter); each pair is made once."""
    made = {}

    def get(tied=True, seed=0):
        if (tied, seed) not in made:
            hf, _ = hf_tiny.tiny_qwen2(tied=tied, seed=seed)
            ours = hf_tiny.converted(hf, tmp_path_factory.mktemp("qwen2"))
            assert ours.vision is None
            made[tied, seed] = hf, ours.text
        return made[tied, seed]

    return get


@jax.jit
def _forward(graphdef, state, ids, pos, mask, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model(model.embed_tokens(ids), pos, kv_mask=mask, cache=cache)
    return model.logits(hidden), cache


def forward(model, ids, pos, mask=None, cache=None):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, ids, pos, mask, cache)


def left_padded(rng, lengths):
    ids, mask = hf_tiny.left_pad([rng.integers(0, 990, n) for n in lengths])
    mask = mask.astype(bool)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what HF generate() assigns
    return ids, mask, pos


def test_mrope_with_equal_axes_is_1d_rope():
    pos = jnp.asarray(np.random.default_rng(0).integers(0, 5000, (2, 7)))
    one = rope_angles(pos, *rope_1d(16, 1e6))
    three = rope_angles(jnp.repeat(pos[..., None], 3, -1), *rope_mrope(16, (2, 3, 3), 1e6))
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_qwen2(build, tied):
    hf, ours = build(tied=tied)
    assert (ours.lm_head is None) == tied
    ids = np.random.default_rng(0).integers(0, 990, (2, 13))
    pos = np.broadcast_to(np.arange(13), ids.shape)
    got, _ = forward(ours, jnp.asarray(ids), jnp.asarray(pos))
    want = hf_tiny.torch_logits(hf, ids)
    assert got.dtype == jnp.float32 and got.shape == (2, 13, hf_tiny.VOCAB)
    assert hf_tiny.max_err(got, want) <= TOL
    # (B, L) positions are the same as (B, L, 3) equal positions, also with the axes of M-RoPE
    # interleaved (a Qwen2 folder reads as section (8, 0, 0): 1-D RoPE on the t axis alone).
    assert ours.cfg.mrope_section == (8, 0, 0)
    mrope_cfg = dataclasses.replace(ours.cfg, mrope_section=(2, 3, 3))
    mrope = nnx.merge(
        nnx.graphdef(nnx.eval_shape(lambda: TextDecoder(mrope_cfg, nnx.Rngs(0)))), nnx.state(ours)
    )
    got3, _ = forward(mrope, jnp.asarray(ids), jnp.asarray(np.repeat(pos[..., None], 3, -1)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(got3))


def test_left_padding_matches_qwen2(build):
    hf, ours = build(tied=True)
    ids, mask, pos = left_padded(np.random.default_rng(1), [12, 7, 3])
    got, _ = forward(ours, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    want = hf_tiny.torch_logits(hf, ids, mask=mask, pos=pos)
    assert hf_tiny.max_err(got, want, mask) <= TOL
    # Padding is invisible: the short example alone gives the same logits.
    alone, _ = forward(ours, jnp.asarray(ids[2:, -3:]), jnp.asarray(pos[2:, -3:]))
    assert hf_tiny.max_err(np.asarray(alone)[0], np.asarray(got)[2, -3:]) <= TOL


def test_cached_decoding_equals_full_forward(build):
    hf, ours = build(tied=False, seed=3)
    total, prompt = 12, 8
    ids, mask, pos = left_padded(np.random.default_rng(2), [12, 9])
    assert ids.shape[1] == total
    want = hf_tiny.torch_logits(hf, ids, mask=mask, pos=pos)
    cache = ours.init_cache(2, 16)
    steps = [(0, prompt)] + [(s, s + 1) for s in range(prompt, total)]
    got = []
    for a, b in steps:
        logits, cache = forward(
            ours,
            jnp.asarray(ids[:, a:b]),
            jnp.asarray(pos[:, a:b]),
            jnp.asarray(mask[:, a:b]),
            cache,
        )
        got.append(np.asarray(logits))
    assert int(cache.index[0]) == total
    got = np.concatenate(got, axis=1)
    assert hf_tiny.max_err(got, want, mask) <= TOL
