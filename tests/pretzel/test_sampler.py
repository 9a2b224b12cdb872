"""The interleaved sampler against a slow reference loop that re-runs both streams over the
whole growing sequence at every step (same keys): text sampling, two generated images with
text between, CFG's unconditional rows, context images; mixed-mode batches equal rows alone;
CFG at scale 0 is conditional sampling; generated images are never re-encoded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax.flow.guidance import gaussian_product
from pretzel_jax.pretzel import sampler
from tests.pretzel import tiny

L = tiny.GRID[0] * tiny.GRID[1]
CFG = sampler.SampleConfig(
    max_new=2 * (L + 2) + 12, max_images=2, temperature=1.0, top_k=20, guidance=1.5
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny.tokenizer(tmp_path_factory.mktemp("tok"))
    # Every coupling knob on: the adapter's 2x2 windows also need the cache's history of u.
    cfg = tiny.config(
        tok, taps=(-1, 0), vlm_grid_stride=2, w_d_scope="after_image", adapter_window=2
    )
    model = tiny.model(cfg, randomize_zero_init=True)
    vs = cfg.vlm.vision_start_token_id
    lay = tiny.layout(tok, vlm_grid_stride=2)
    laid = lay.document(tiny.vqa_doc(0))  # a context image, then the question
    cut = len(laid.tokens) - 4
    prompts = [
        (laid.tokens[:cut], laid.positions[:cut], laid.images),
        _text(tok, "a red circle", vs),
        _text(tok, "two blue square left of a", None),
        _text(tok, "a", vs),
    ]
    return tok, model, prompts, tok.token_to_id("<|endoftext|>")


def _text(tok, text, vs):
    ids = tok.encode(text).ids + ([vs] if vs is not None else [])
    return np.asarray(ids, np.int32), sampler.text_positions(len(ids)), np.zeros((0, 4, 4, 3))


def _slow(model, prompt, row_key, cfg, size, negative=None):
    """One row, the whole sequence through `Pretzel.streams` at every step; CFG's unconditional
    row is `<vision_start>` alone at id 0, or the `negative` tokens (ending in it) at 0, 1, ..."""
    mc = model.cfg
    vs, ve, img = (
        mc.vlm.vision_start_token_id,
        mc.vlm.vision_end_token_id,
        mc.vlm.image_token_id,
    )
    gh, gw = mc.latent_grid
    resume = max(gh, gw) // mc.vlm_grid_stride
    streams = jax.jit(model.streams)

    def run(tokens, pos, u):
        n = len(tokens)
        pad = size - n
        t = np.pad(np.asarray(tokens, np.int32), (0, pad))[None]
        p = np.pad(np.asarray(pos, np.int32), ((0, pad), (0, 0)))[None]
        uu = np.pad(np.asarray(u, np.float32), ((0, pad), (0, 0)))[None]
        seg = (np.arange(size) < n).astype(np.int32)[None]
        out = streams(t, uu, p, seg, np.zeros_like(seg))
        return out["hidden"][0, n - 1], out["a"][0, n - 1], out["mu"][0, n - 1]

    tokens, pos, images = list(prompt[0]), [list(p) for p in prompt[1]], prompt[2]
    u = [np.zeros(mc.flow.token_dim, np.float32) for _ in tokens]
    if len(images):
        keys = jnp.stack([sampler.context_key(row_key, k) for k in range(len(images))])
        ctx = np.asarray(sampler._context_u(*nnx.split(model), images, keys))
        slots = [i for i, t in enumerate(tokens) if t == img]
        for i, v in zip(slots, ctx.reshape(-1, ctx.shape[-1]), strict=True):
            u[i] = v
    gen, latents, n, reason = [], [], 0, "max_new"
    image = tokens[-1] == vs
    p = pos[-1][0] + 1
    opening = [vs] if negative is None else [int(t) for t in negative]

    def fresh_uncond():
        return list(opening), [[i] * 3 for i in range(len(opening))], [u[0] * 0] * len(opening)

    p0, j, uncond, q0 = p, 0, fresh_uncond(), len(opening)  # q0: its first latent's id
    if image:
        latents.append([])
    while n < cfg.max_new:
        h, a, mu = run(tokens, pos, u)
        key = sampler.position_key(row_key, n)
        if not image:
            logits = np.asarray(model.logits(h[None, None])[0, 0], np.float32).copy()
            logits[[img, ve]] = -np.inf
            if len(latents) >= cfg.max_images:
                logits[vs] = -np.inf
            tok = int(
                sampler.pick_token(jnp.asarray(logits), key, cfg.temperature, cfg.top_k, cfg.top_p)
            )
            if tok == vs and cfg.max_new - n < L + 2:
                reason = "no_room"
                break
            tokens.append(tok), pos.append([p] * 3), u.append(u[0] * 0), gen.append(tok)
            n += 1
            if tok in cfg.stop_tokens:
                reason = "stop_token"
                break
            if tok == vs:
                image, p0, j = True, p + 1, 0
                latents.append([])
                uncond = fresh_uncond()
            p += 1
        elif j < L:
            sigma = model.deep.sigma(a)
            if cfg.guidance > 0:
                _, a_u, mu_u = run(*uncond)
                mu, sigma = gaussian_product(mu, sigma, mu_u, model.deep.sigma(a_u), cfg.guidance)
            eps = jax.random.normal(key, (mc.flow.token_dim,), jnp.float32)
            v = np.asarray(mu + sigma * cfg.image_temperature * eps)
            r, c = divmod(j, gw)
            tokens.append(img), pos.append([p0, p0 + r, p0 + c]), u.append(v), gen.append(img)
            uncond[0].append(img), uncond[1].append([q0, q0 + r, q0 + c]), uncond[2].append(v)
            latents[-1].append(v)
            j, n = j + 1, n + 1
        else:
            tokens.append(ve), pos.append([p0 + resume] * 3), u.append(u[0] * 0), gen.append(ve)
            p, image, n = p0 + resume + 1, False, n + 1
    return gen, reason, np.asarray(latents)


def test_interleaved_sampling_equals_the_slow_loop(setup):
    tok, model, prompts, pad = setup
    key = jax.random.key(5)  # row 1: an image, text, a second image; rows stop both ways
    out = sampler.sample(model, prompts, key, CFG, pad_id=pad)
    size = max(len(p[0]) for p in prompts) + CFG.max_new
    vs, img = model.cfg.vlm.vision_start_token_id, model.cfg.vlm.image_token_id
    two_with_text_between = False
    for i, (prompt, row_key) in enumerate(zip(prompts, sampler.row_keys(key, 4), strict=True)):
        gen, reason, latents = _slow(model, prompt, row_key, CFG, size)
        assert out[i]["tokens"] == gen, i
        assert out[i]["reason"] == reason
        np.testing.assert_allclose(out[i]["u"], latents.reshape(out[i]["u"].shape), atol=1e-4)
        text = [t for t in gen if t != img]
        if len(latents) == 2 and text.index(vs) > 1:  # <vision_end>, text, <vision_start>
            two_with_text_between = True
    assert two_with_text_between
    assert {r["reason"] for r in out} >= {"max_new", "no_room"}


def test_mixed_mode_batch_equals_rows_alone_and_cfg_scale_0(setup):
    tok, model, prompts, pad = setup
    key = jax.random.key(0)
    batch = sampler.sample(model, prompts, key, CFG, pad_id=pad)
    for prompt, row_key, row in zip(prompts, sampler.row_keys(key, 4), batch, strict=True):
        alone = sampler.sample(model, [prompt], row_key[None], CFG, pad_id=pad)[0]
        assert alone["tokens"] == row["tokens"] and alone["reason"] == row["reason"]
        np.testing.assert_allclose(alone["u"], row["u"], atol=1e-5)
        np.testing.assert_allclose(alone["images"], row["images"], atol=1e-5)
    # CFG at scale 0 (no unconditional rows) equals a vanishing scale through them.
    cond = sampler.SampleConfig(**{**CFG.__dict__, "guidance": 0.0})
    tiny_scale = sampler.SampleConfig(**{**CFG.__dict__, "guidance": 1e-9})
    a = sampler.sample(model, prompts, key, cond, pad_id=pad)
    b = sampler.sample(model, prompts, key, tiny_scale, pad_id=pad)
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"]
        np.testing.assert_allclose(x["u"], y["u"], atol=1e-5)
    # The guided first image of row 1 (its prompt opens it) differs from the conditional one.
    assert np.abs(a[1]["u"][0] - batch[1]["u"][0]).max() > 1e-3


def test_negative_prompts_take_the_empty_prompts_place(setup):
    """Text-to-image with a negative prompt as CFG's unconditional row equals the slow loop run
    with that row (an empty one: the default CFG's row); misuse is one clear error."""
    tok, model, prompts, pad = setup
    vs = model.cfg.vlm.vision_start_token_id
    t2i = [prompts[1], prompts[1]]  # the same text-to-image prompt and key: only the negatives
    negative = [np.asarray([*tok.encode("two blue square").ids, vs], np.int32), np.asarray([vs])]
    cfg = sampler.SampleConfig(max_new=L + 1, guidance=1.5)
    key = jax.random.key(3)
    keys = jnp.stack([key, key])
    out = sampler.sample(model, t2i, keys, cfg, pad_id=pad, negative=negative)
    size = len(t2i[0][0]) + cfg.max_new
    for i in range(2):
        _, _, latents = _slow(model, t2i[i], key, cfg, size, negative=negative[i])
        np.testing.assert_allclose(out[i]["u"], latents.reshape(out[i]["u"].shape), atol=1e-4)
    assert np.abs(out[0]["u"] - out[1]["u"]).max() > 1e-3
    misuse = [
        (dict(cfg=sampler.SampleConfig(max_new=L + 1)), "guidance > 0"),
        (dict(negative=negative[:1]), "one per prompt"),
        (dict(prompts=[prompts[2], prompts[3]]), "ending in <vision_start>"),
        (dict(negative=[negative[0][:-1], negative[1]]), "must end in <vision_start>"),
    ]
    for change, message in misuse:
        kw = dict(prompts=t2i, cfg=cfg, negative=negative) | change
        with pytest.raises(ValueError, match=message):
            sampler.sample(
                model, kw["prompts"], key, kw["cfg"], pad_id=pad, negative=kw["negative"]
            )


def test_generated_images_are_never_re_encoded(setup, monkeypatch):
    tok, model, prompts, pad = setup
    seen = []
    encode = tiny.ToyFAE.encode

    def counting(self, images):
        seen.append(images.shape[0])
        return encode(self, images)

    monkeypatch.setattr(tiny.ToyFAE, "encode", counting)
    sampler._sample.clear_cache()
    sampler._context_u.clear_cache()
    out = sampler.sample(model, prompts, jax.random.key(1), CFG, pad_id=pad)
    assert sum(len(r["u"]) for r in out) >= 2  # images were generated
    assert seen == [1]  # one trace of the encoder, for the one prompt image
    # The BAGEL-style baseline re-encodes each generated image (the count can fail).
    base = sampler.SampleConfig(**{**CFG.__dict__, "reencode": True})
    out = sampler.sample(model, prompts, jax.random.key(1), base, pad_id=pad)
    assert seen == [1, 4]  # (the prompt image's trace is cached) every row's image at <vision_end>
    assert sum(len(r["u"]) for r in out) >= 2


def test_image_every_fixes_the_schedule(setup):
    tok, model, prompts, pad = setup
    cfg = sampler.SampleConfig(**{**CFG.__dict__, "image_every": 4, "max_new": 2 * (L + 2) + 8})
    vs, ve = model.cfg.vlm.vision_start_token_id, model.cfg.vlm.vision_end_token_id
    img = model.cfg.vlm.image_token_id
    for prompt, row in zip(
        prompts, sampler.sample(model, prompts, jax.random.key(2), cfg, pad_id=pad), strict=True
    ):
        opened = prompt[0][-1] == vs
        assert len(row["u"]) == 2
        text = [t for t in row["tokens"] if t != img]
        runs = "".join("v" if t == vs else "e" if t == ve else "t" for t in text)
        assert runs.startswith("etttt" if opened else "ttttv"), runs
        assert runs.count("v") == 2 - opened and runs.count("e") == 2
        assert all(gap == "ttttv" for gap in runs.split("e")[1:-1])  # text between images


def test_block_jacobi_equals_sequential_decoding_at_tol_0(setup):
    tok, model, prompts, pad = setup
    seq = sampler.SampleConfig(**{**CFG.__dict__, "image_every": 4, "max_new": 2 * (L + 2) + 8})
    jac = sampler.SampleConfig(**{**seq.__dict__, "jacobi_chunk": L // 2})
    keys = sampler.row_keys(jax.random.key(3), 4)
    a = sampler.sample(model, prompts, keys, seq, pad_id=pad)
    # In the batch, rows 0 and 2 open their images later than rows 1 and 3 (latents one at a
    # time there); alone, rows 1 and 3 stay aligned (every latent by block-Jacobi).
    b = sampler.sample(model, prompts, keys, jac, pad_id=pad)
    aligned = [1, 3]
    c = sampler.sample(
        model, [prompts[i] for i in aligned], keys[np.array(aligned)], jac, pad_id=pad
    )
    for x, y in zip([*a, a[1], a[3]], [*b, *c], strict=True):
        assert x["tokens"] == y["tokens"] and x["reason"] == y["reason"]
        np.testing.assert_allclose(y["u"], x["u"], atol=1e-5)  # float rounding only
    # Two images each, two chunks per image, at most K calls per chunk.
    assert all(len(r["u"]) == 2 for r in c)
    assert 4 < c[0]["jacobi_calls"] <= 4 * L // 2
    # One call per chunk (tol inf) is another, cheaper sampler: it can fail the check above.
    one = sampler.SampleConfig(**{**jac.__dict__, "jacobi_tol": float("inf")})
    d = sampler.sample(
        model, [prompts[i] for i in aligned], keys[np.array(aligned)], one, pad_id=pad
    )
    assert d[0]["jacobi_calls"] == 4
    assert np.abs(d[0]["u"][0] - c[0]["u"][0]).max() > 1e-3
    bad = sampler.SampleConfig(max_new=30, jacobi_chunk=3)
    with pytest.raises(ValueError, match="jacobi_chunk must be 0 or divide"):
        sampler.sample(model, prompts, keys, bad, pad_id=pad)
