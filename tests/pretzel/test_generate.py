"""The joint-cache samplers: text-to-image inverts the teacher-forced flow exactly (with and
without CFG at scale 0), CFG changes samples, greedy answers equal a slow argmax loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax.pretzel import generate, sampler
from tests.pretzel import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny.tokenizer(tmp_path_factory.mktemp("tok"))
    model = tiny.model(tiny.config(tok, taps=(-1, 0)), randomize_zero_init=True)
    return tok, model


def _teacher_forced_z(model, prompt, u):
    """z of the sampled latents under the teacher-forced forward of [prompt, vs, u, ve]."""
    cfg = model.cfg
    big_l = cfg.latents_per_image
    tokens = np.asarray(
        [
            *prompt,
            cfg.vlm.vision_start_token_id,
            *[cfg.vlm.image_token_id] * big_l,
            cfg.vlm.vision_end_token_id,
        ],
        np.int32,
    )[None]
    n = len(prompt) + 1
    gh, gw = cfg.latent_grid
    rows, cols = np.divmod(np.arange(big_l), gw)
    positions = np.concatenate(
        [
            generate.text_positions(n),
            np.stack([np.full(big_l, n), n + rows, n + cols], -1),
            generate.text_positions(1, n + max(gh, gw)),
        ]
    )[None].astype(np.int32)
    u_seq = np.zeros((*tokens.shape, cfg.flow.token_dim), np.float32)
    u_seq[0, n : n + big_l] = u
    seg = np.ones_like(tokens)
    out = model.streams(
        jnp.asarray(tokens),
        jnp.asarray(u_seq),
        jnp.asarray(positions),
        jnp.asarray(seg),
        jnp.zeros_like(seg),
    )
    a, mu = out["a"][0, n - 1 : n - 1 + big_l], out["mu"][0, n - 1 : n - 1 + big_l]
    return np.asarray((u - mu) / model.deep.sigma(a))


def test_t2i_samples_invert_the_teacher_forced_flow(setup):
    tok, model = setup
    prompts = [tok.encode("a red circle").ids, tok.encode("two blue square left of a").ids]
    key = jax.random.key(0)
    big_l = model.cfg.latents_per_image
    keys = sampler.row_keys(key, 2)
    noise = np.asarray(
        [
            [jax.random.normal(sampler.position_key(k, n), (tiny.CHANNELS,)) for n in range(big_l)]
            for k in keys
        ]
    )
    out = generate.t2i(model, prompts, key, pad_id=tok.token_to_id("<|endoftext|>"))
    for i, p in enumerate(prompts):
        z = _teacher_forced_z(model, p, out["u"][i])
        np.testing.assert_allclose(z, noise[i], atol=2e-4, rtol=2e-4)
    # The shallow inverse: forward of x gives back u.
    u_back, _ = model.shallow_forward(jnp.asarray(out["x"]))
    np.testing.assert_allclose(np.asarray(u_back), out["u"], atol=2e-4, rtol=2e-4)
    # CFG: scale 0 is conditional sampling; a positive scale moves the samples.
    pad = tok.token_to_id("<|endoftext|>")
    guided = generate.t2i(model, prompts, key, guidance=2.0, pad_id=pad)
    assert np.abs(guided["u"] - out["u"]).max() > 1e-3
    tiny_scale = generate.t2i(model, prompts, key, guidance=1e-9, pad_id=pad)
    np.testing.assert_allclose(tiny_scale["u"], out["u"], atol=1e-5)


def test_greedy_answers_equal_an_uncached_argmax_loop(setup):
    tok, model = setup
    lay = tiny.layout(tok)
    doc = tiny.vqa_doc(0)
    laid = lay.document(doc)
    cut = len(laid.tokens) - 4  # the prompt: everything before the answer's last tokens
    prompt = (laid.tokens[:cut], laid.positions[:cut], laid.images)
    pad = tok.token_to_id("<|endoftext|>")
    key = jax.random.key(1)
    got = generate.answer(
        model, [prompt, prompt], key, stop_tokens=[-1], max_new_tokens=3, pad_id=pad
    )
    assert [len(g) for g in got] == [3, 3]
    # Slow loop per row: the whole growing sequence through the teacher-forced streams each
    # step; the FAE path's noise is drawn for both rows' images at once, as `answer` draws it.
    both = np.concatenate([laid.images, laid.images])
    image_keys = jnp.stack([sampler.context_key(k, 0) for k in sampler.row_keys(key, 2)])
    u_rows = np.asarray(sampler._context_u(*nnx.split(model), both, image_keys))
    for row, u in enumerate(u_rows):
        tokens, positions = list(prompt[0]), list(prompt[1])
        for _ in range(3):
            t = np.asarray(tokens, np.int32)[None]
            u_seq = np.zeros((*t.shape, tiny.CHANNELS), np.float32)
            u_seq[0, t[0] == model.cfg.vlm.image_token_id] = u.reshape(-1, tiny.CHANNELS)
            seg = np.ones_like(t)
            out = model.streams(
                jnp.asarray(t),
                jnp.asarray(u_seq),
                jnp.asarray(np.asarray(positions)[None]),
                jnp.asarray(seg),
                jnp.zeros_like(jnp.asarray(seg)),
            )
            nxt = int(np.argmax(np.asarray(model.logits(out["hidden"]))[0, -1]))
            tokens.append(nxt)
            positions.append([positions[-1][0] + 1] * 3)
        assert got[row] == tokens[-3:]
