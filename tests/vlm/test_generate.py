"""generate(): greedy decoding equals transformers' generate on tiny Qwen2 / Qwen2.5-VL models
(weights imported with convert.hf_qwen25vl.load), sampling filters equal HF's logits warpers,
stop tokens stop, and one compile serves a shape bucket.

Text-model tests use batch 2 and one bucket throughout, so they share compiled programs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from pretzel_jax.convert.hf_qwen25vl import load
from pretzel_jax.vlm.generate import _prefill_and_decode, filter_logits, generate, sample_token
from tests.vlm.hf_tiny import (
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    save,
    tiny_qwen2,
    tiny_qwen25vl,
)

NEW = 20


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    hf, _ = tiny_qwen2(tied=False, seed=1)
    path = tmp_path_factory.mktemp("qwen2")
    save(hf, path)
    return hf, load(path)


@pytest.fixture(scope="module")
def qwen25vl(tmp_path_factory):
    hf = tiny_qwen25vl(seed=2)
    path = tmp_path_factory.mktemp("qwen25vl")
    save(hf, path)
    return hf, load(path)


def left_padded(seqs):
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), PAD_TOKEN_ID, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for b, s in enumerate(seqs):
        ids[b, length - len(s) :], mask[b, length - len(s) :] = s, 1
    return ids, mask


def text_prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 900, n)) for n in lengths]


def hf_greedy(hf, ids, mask, **kw):
    """HF greedy continuation (B, NEW), padded with PAD after EOS (HF stops when all are done)."""
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=PAD_TOKEN_ID,
            **kw,
        )[:, ids.shape[1] :].numpy()
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD_TOKEN_ID)


def ours(model, ids, mask, **kw):
    kw = dict(max_new_tokens=NEW, stop_tokens=[EOS_TOKEN_ID], pad_token_id=PAD_TOKEN_ID) | kw
    return generate(model, ids, mask, **kw)


def test_greedy_text_batch_left_padding_matches_hf(qwen2):
    hf, model = qwen2
    ids, mask = left_padded(text_prompts(0, [5, 11]))
    out = ours(model, ids, mask)
    np.testing.assert_array_equal(out.tokens, hf_greedy(hf, ids, mask))
    # Right padding is re-packed to the left: same continuation.
    right = np.full_like(ids, PAD_TOKEN_ID)
    right_mask = np.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = mask[b].sum()
        right[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    np.testing.assert_array_equal(ours(model, right, right_mask).tokens, out.tokens)


def test_greedy_vl_with_image_matches_hf(qwen25vl):
    hf, model = qwen25vl
    rng = np.random.default_rng(1)
    grid = [[1, 6, 10]]  # 60 patches -> 15 image tokens (3 x 5 merged grid)
    image = [VISION_START_TOKEN_ID, *[IMAGE_TOKEN_ID] * 15, VISION_END_TOKEN_ID]
    seqs = [
        list(rng.integers(0, 900, 3)) + image + list(rng.integers(0, 900, 4)),
        list(rng.integers(0, 900, 6)),
    ]
    ids, mask = left_padded(seqs)
    pixels = rng.standard_normal((60, 3 * 2 * 14 * 14)).astype(np.float32)
    ref = hf_greedy(
        hf,
        ids,
        mask,
        pixel_values=torch.as_tensor(pixels),
        image_grid_thw=torch.as_tensor(grid),
        mm_token_type_ids=torch.as_tensor(ids == IMAGE_TOKEN_ID).int(),
    )
    out = ours(model, ids, mask, pixel_values=pixels, image_grid_thw=np.asarray(grid))
    np.testing.assert_array_equal(out.tokens, ref)


def test_sampling_top_k_1_is_greedy_and_seeded(qwen2):
    _, model = qwen2
    ids, mask = left_padded(text_prompts(2, [7, 4]))
    greedy = ours(model, ids, mask).tokens
    k1 = ours(model, ids, mask, temperature=1.5, top_k=1, seed=3).tokens
    np.testing.assert_array_equal(k1, greedy)
    a = ours(model, ids, mask, temperature=1.0, top_p=0.9, seed=4).tokens
    b = ours(model, ids, mask, temperature=1.0, top_p=0.9, seed=4).tokens
    c = ours(model, ids, mask, temperature=1.0, top_p=0.9, seed=5).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("top_k, top_p", [(2, 1.0), (0, 0.6), (0, 0.8), (4, 0.95), (3, 0.3)])
def test_filters_match_hf_warpers(top_k, top_p):
    probs = np.asarray([[0.05, 0.5, 0.02, 0.15, 0.2, 0.08], [0.3, 0.25, 0.2, 0.12, 0.08, 0.05]])
    logits = np.log(probs).astype(np.float32)
    ref = torch.as_tensor(logits)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(jax.jit(filter_logits)(logits, top_k, top_p))
    np.testing.assert_array_equal(got > -1e30, np.isfinite(ref.numpy()))
    kept = np.isfinite(ref.numpy())
    np.testing.assert_array_equal(got[kept], logits[kept])
    assert kept.sum(1).min() >= 1 and (~kept).any()


def test_sampling_draws_only_kept_tokens():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.02, 0.15, 0.2, 0.08]] * 512, jnp.float32))
    draw = functools.partial(
        sample_token, greedy=False, filtered=True, temperature=1.0, top_k=0, top_p=0.8
    )
    toks = jax.jit(draw)(logits, jax.random.key(0))
    assert set(np.asarray(toks).tolist()) == {1, 3, 4}  # 0.5 + 0.2 + 0.15 reach 0.8


def test_stop_tokens_stop_per_example(qwen2):
    _, model = qwen2
    ids, mask = left_padded(text_prompts(3, [6, 9]))
    free = ours(model, ids, mask, stop_tokens=[]).tokens
    stop = int(free[0, 3])
    out = ours(model, ids, mask, stop_tokens=[stop])
    for b in range(2):
        hits = np.flatnonzero(free[b] == stop)
        n = hits[0] + 1 if hits.size else NEW
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
        assert (out.tokens[b, n:] == PAD_TOKEN_ID).all()
    assert out.lengths[0] <= 4


def test_one_compile_per_bucket(qwen2):
    _, model = qwen2
    fn = _prefill_and_decode
    ids, mask = left_padded(text_prompts(4, [5, 8]))
    ours(model, ids, mask, temperature=0.7, top_p=0.9, seed=1)
    size = fn._cache_size()
    assert size >= 1
    # Other prompt lengths in the same bucket, other temperature / top_p / seed / stop tokens.
    ids2, mask2 = left_padded(text_prompts(5, [12, 3]))
    ours(model, ids2, mask2, temperature=1.3, top_p=0.5, seed=2, stop_tokens=[1, 2, 3])
    ours(model, ids, mask, temperature=0.2, top_p=0.95, seed=3, stop_tokens=[4, 5, 6])
    ours(model, ids, mask, temperature=0.5, top_k=3, seed=4)
    assert fn._cache_size() == size


def test_errors(qwen2):
    _, model = qwen2
    ids, mask = left_padded(text_prompts(7, [3, 2]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, mask, top_p=0.0)
    mask[1] = 0
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(model, ids, mask)
