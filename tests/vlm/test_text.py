"""TextDecoder vs transformers' Qwen2ForCausalLM (tiny, random, fp32): plain, left-padded and
cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pretzel_jax.nn import rope_1d, rope_angles, rope_mrope
from pretzel_jax.vlm.text import TextConfig, TextDecoder
from tests.vlm import hf_tiny

TOL = 1e-4


def text_config_of(hf_cfg, **kw) -> TextConfig:
    return TextConfig(
        vocab_size=hf_cfg.vocab_size,
        hidden_size=hf_cfg.hidden_size,
        intermediate_size=hf_cfg.intermediate_size,
        num_layers=hf_cfg.num_hidden_layers,
        num_heads=hf_cfg.num_attention_heads,
        num_kv_heads=hf_cfg.num_key_value_heads,
        rms_norm_eps=hf_cfg.rms_norm_eps,
        rope_theta=hf_cfg.rope_parameters["rope_theta"],
        mrope_section=hf_cfg.rope_parameters.get("mrope_section", (2, 3, 3)),
        tie_word_embeddings=hf_cfg.tie_word_embeddings,
        **kw,
    )


def load_text_weights(decoder: TextDecoder, sd: dict, prefix: str = "model.") -> TextDecoder:
    """Test-local HF -> ours name/shape map (torch Linear (out, in) -> kernel (in, out); layers
    stacked on axis 0). The production map lives in pretzel_jax.convert.hf_qwen25vl."""
    n = decoder.cfg.num_layers
    t = lambda k: sd[k].detach().float().numpy()

    def stack(name, transpose):
        arrs = [t(f"{prefix}layers.{i}.{name}") for i in range(n)]
        return np.stack([a.T if transpose else a for a in arrs])

    flat = {
        ("embed",): t(f"{prefix}embed_tokens.weight"),
        ("norm", "scale"): t(f"{prefix}norm.weight"),
    }
    L = ("layers", "layers")
    for proj in "qkv":
        flat[(*L, "attn", proj, "kernel")] = stack(f"self_attn.{proj}_proj.weight", True)
        flat[(*L, "attn", proj, "bias")] = stack(f"self_attn.{proj}_proj.bias", False)
    flat[(*L, "attn", "o", "kernel")] = stack("self_attn.o_proj.weight", True)
    for proj in ("gate", "up", "down"):
        flat[(*L, "mlp", proj, "kernel")] = stack(f"mlp.{proj}_proj.weight", True)
    flat[(*L, "attn_norm", "scale")] = stack("input_layernorm.weight", False)
    flat[(*L, "mlp_norm", "scale")] = stack("post_attention_layernorm.weight", False)
    if decoder.lm_head is not None:
        flat[("lm_head", "kernel")] = t("lm_head.weight").T
    state = nnx.state(decoder, nnx.Param)
    paths = {p for p, _ in nnx.to_flat_state(state)}
    assert paths == set(flat), paths ^ set(flat)
    for path, var in nnx.to_flat_state(state):
        assert var.get_value().shape == flat[path].shape, path
        var.set_value(jnp.asarray(flat[path], var.get_value().dtype))
    nnx.update(decoder, state)
    return decoder


def build(tied=True, seed=0):
    hf, hf_cfg = hf_tiny.tiny_qwen2(tied=tied, seed=seed)
    ours = TextDecoder(text_config_of(hf_cfg), nnx.Rngs(1))
    return hf, load_text_weights(ours, hf.state_dict())


def hf_logits(hf, ids, mask=None, pos=None):
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(np.asarray(ids)),
            attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)),
            position_ids=None if pos is None else torch.as_tensor(np.asarray(pos)),
        )
    return out.logits.float().numpy()


@jax.jit
def _forward(graphdef, state, ids, pos, mask, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model(model.embed_tokens(ids), pos, kv_mask=mask, cache=cache)
    return model.logits(hidden), cache


def forward(model, ids, pos, mask=None, cache=None):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, ids, pos, mask, cache)


def left_padded(rng, lengths, total):
    ids = np.full((len(lengths), total), hf_tiny.PAD_TOKEN_ID, np.int64)
    mask = np.zeros((len(lengths), total), bool)
    for b, n in enumerate(lengths):
        ids[b, total - n :] = rng.integers(0, 990, n)
        mask[b, total - n :] = True
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what HF generate() assigns
    return ids, mask, pos


def test_mrope_with_equal_axes_is_1d_rope():
    pos = jnp.asarray(np.random.default_rng(0).integers(0, 5000, (2, 7)))
    one = rope_angles(pos, *rope_1d(16, 1e6))
    three = rope_angles(jnp.repeat(pos[..., None], 3, -1), *rope_mrope(16, (2, 3, 3), 1e6))
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_qwen2(tied):
    hf, ours = build(tied=tied)
    assert (ours.lm_head is None) == tied
    ids = np.random.default_rng(0).integers(0, 990, (2, 13))
    pos = np.broadcast_to(np.arange(13), ids.shape)
    got, _ = forward(ours, jnp.asarray(ids), jnp.asarray(pos))
    want = hf_logits(hf, ids)
    assert got.dtype == jnp.float32 and got.shape == (2, 13, hf_tiny.VOCAB)
    assert np.abs(np.asarray(got) - want).max() <= TOL
    # (B, L) positions are the same as (B, L, 3) equal positions.
    got3, _ = forward(ours, jnp.asarray(ids), jnp.asarray(np.repeat(pos[..., None], 3, -1)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(got3))


def test_left_padding_matches_qwen2():
    hf, ours = build(tied=True)
    ids, mask, pos = left_padded(np.random.default_rng(1), [12, 7, 3], 12)
    got, _ = forward(ours, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    want = hf_logits(hf, ids, mask, pos)
    err = np.abs(np.asarray(got) - want).max(-1)
    assert err[mask].max() <= TOL
    # Padding is invisible: the short example alone gives the same logits.
    alone, _ = forward(ours, jnp.asarray(ids[2:, -3:]), jnp.asarray(pos[2:, -3:]))
    assert np.abs(np.asarray(alone)[0] - np.asarray(got)[2, -3:]).max() <= TOL


def test_cached_decoding_equals_full_forward():
    hf, ours = build(tied=False, seed=3)
    total, prompt = 12, 8
    ids, mask, pos = left_padded(np.random.default_rng(2), [12, 9], total)
    want = hf_logits(hf, ids, mask, pos)
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
    assert np.abs(got - want).max(-1)[mask].max() <= TOL
