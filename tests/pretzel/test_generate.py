"""The generation modes are single calls of the interleaved sampler (which
tests/pretzel/test_sampler.py checks against a slow full-forward loop): text-to-image returns
the sampler's latents, their shallow inverse and decoded images; answers are greedy and cut at
the stop token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pretzel_jax.pretzel import generate, sampler
from tests.pretzel import tiny


def test_t2i_and_answer_are_sampler_calls(tmp_path):
    tok = tiny.tokenizer(tmp_path)
    model = tiny.model(tiny.config(tok, taps=(-1, 0)), randomize_zero_init=True)
    pad, vs = tok.token_to_id("<|endoftext|>"), model.cfg.vlm.vision_start_token_id
    big_l = model.cfg.latents_per_image
    prompts = [tok.encode("a red circle").ids, tok.encode("two blue square left of a").ids]
    key = jax.random.key(0)
    out = generate.t2i(model, prompts, key, guidance=2.0, pad_id=pad)
    rows = [
        (np.asarray([*p, vs], np.int32), sampler.text_positions(len(p) + 1), ()) for p in prompts
    ]
    cfg = sampler.SampleConfig(max_new=big_l + 1, guidance=2.0)
    ref = sampler.sample(model, rows, key, cfg, pad_id=pad)
    np.testing.assert_array_equal(out["u"], np.stack([r["u"][0] for r in ref]))
    assert all(r["tokens"][-1] == model.cfg.vlm.vision_end_token_id for r in ref)
    u_back, _ = model.shallow_forward(jnp.asarray(out["x"]))  # x is the shallow inverse of u
    np.testing.assert_allclose(np.asarray(u_back), out["u"], atol=2e-4, rtol=2e-4)
    assert out["images"].shape == (2, 4, 4, 3) and 0 <= out["images"].min() <= 1

    laid = tiny.layout(tok).document(tiny.vqa_doc(0))
    cut = len(laid.tokens) - 4  # the prompt: everything before the answer's last tokens
    prompt = (laid.tokens[:cut], laid.positions[:cut], laid.images)
    stop = [tok.token_to_id(w) for w in ("a", "red", "blue", "circle", "square", "two")]
    got = generate.answer(model, [prompt] * 2, key, stop_tokens=stop, max_new_tokens=5, pad_id=pad)
    raw = sampler.sample(
        model, [prompt] * 2, key, sampler.SampleConfig(max_new=5, max_images=0), pad_id=pad
    )
    for g, r in zip(got, raw, strict=True):  # greedy: the stopless run's tokens up to a stop
        first = next((i for i, t in enumerate(r["tokens"]) if t in stop), len(r["tokens"]))
        assert g == r["tokens"][:first]
    assert any(len(g) < 5 for g in got)  # a stop token was hit


def test_layout_prompts_are_prefixes_of_training_documents(tmp_path):
    """A prompt is laid out exactly as the training document it starts: text-to-image up to
    the image's `<vision_start>`, a question up to its answer (the assistant header)."""
    tok = tiny.tokenizer(tmp_path)
    lay = tiny.layout(tok, vlm_grid_stride=2)
    full = lay.document(tiny.t2i_doc(0, "a red circle"))
    tokens, positions, images = lay.prompt(
        tiny.t2i_doc(0, "a red circle").segments[:1], open_image=True
    )
    n = len(tokens)
    assert tokens[-1] == lay.vision_start_id and len(images) == 0
    np.testing.assert_array_equal(tokens, full.tokens[:n])
    np.testing.assert_array_equal(positions, full.positions[:n])
    doc = tiny.vqa_doc(0)  # image and question (user), answer "yes" (assistant)
    full = lay.document(doc)
    tokens, positions, images = lay.prompt(doc.segments[:2], reply=True)
    n = len(tokens)
    answer = tok.token_to_id("yes")
    assert full.tokens[n] == answer  # the prompt ends where the answer starts
    np.testing.assert_array_equal(tokens, full.tokens[:n])
    np.testing.assert_array_equal(positions, full.positions[:n])
    np.testing.assert_array_equal(images, full.images)
