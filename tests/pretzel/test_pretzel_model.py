"""The Pretzel model's invariants: zero-init coupling is the frozen VLM (bit-exact) and the
standalone flow; causality across both streams; packed documents equal documents alone; cached
step-by-step decoding through the joint cache equals the teacher-forced forward; masked
per-image likelihood."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax.flow.likelihood import nll_per_dim
from tests.pretzel import tiny


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def lay(tok):
    return tiny.layout(tok)


def _jit_forward(model, batch):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        return nnx.merge(graphdef, state).forward(batch, None)

    return run(state, {k: jnp.asarray(v) for k, v in batch.items()})


def _vlm_alone_logits(model, batch):
    """The frozen VLM by itself: token embeddings, zeros at latent slots (what A(u) is at init)."""
    vlm = model.vlm
    tokens = jnp.asarray(batch["tokens"])
    x = vlm.text.embed_tokens(tokens)
    x = jnp.where((tokens == vlm.cfg.image_token_id)[..., None], 0.0, x)
    seg = jnp.asarray(batch["segment_ids"])
    y, _ = vlm.forward(
        x,
        jnp.asarray(batch["positions"]),
        kv_mask=seg > 0,
        segment_ids=seg,
        branch_ids=jnp.asarray(batch["branch_ids"]),
    )
    return vlm.logits(y)


@pytest.mark.parametrize("docs", ["text", "images"])
def test_zero_init_text_logits_are_the_frozen_vlms_bit_exactly(tok, lay, docs):
    rows = (
        [[tiny.text_doc(0)], [tiny.text_doc(1)]]
        if docs == "text"
        else [[tiny.interleaved_doc(0)], [tiny.vqa_doc(1), tiny.t2i_doc(2)]]
    )
    batch = tiny.batch(lay, rows)
    model = tiny.model(tiny.config(tok, taps=(-1, 0)))
    # The flow stream is trained (random), the coupling is at its zero init.
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    key = jax.random.key(3)
    for path, var in flat:
        name = "/".join(map(str, path))
        if name.startswith(("deep/", "shallow/")):
            key, sub = jax.random.split(key)
            var.set_value(var.get_value() + 0.1 * jax.random.normal(sub, var.get_value().shape))
    nnx.update(model, nnx.from_flat_state(flat))
    ours = jax.jit(lambda b: model.logits(model.forward(b, None)["hidden"]))(
        {k: jnp.asarray(v) for k, v in batch.items()}
    )
    alone = jax.jit(lambda b: _vlm_alone_logits(model, b))(batch)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(alone))
    if docs == "images":  # the coupling switched on does change them (the test can fail)
        on = tiny.model(tiny.config(tok, taps=(-1, 0)), randomize_zero_init=True)
        theirs = jax.jit(lambda b: on.logits(on.forward(b, None)["hidden"]))(
            {k: jnp.asarray(v) for k, v in batch.items()}
        )
        assert np.abs(np.asarray(theirs) - np.asarray(alone)).max() > 1e-3


def test_flow_stream_nll_equals_the_standalone_flows(tok, lay):
    """A text-to-image document: the deep block over the interleaved row equals the standalone
    deep block with y_vlm of the text as its context prefix, the shallow blocks the same."""
    batch = tiny.batch(lay, [[tiny.t2i_doc(0, "a red circle left of a blue square")]])
    model = tiny.model(tiny.config(tok), randomize_zero_init=False)
    # Random flow heads (zero-init heads would make both sides the identity map).
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    key = jax.random.key(7)
    for path, var in flat:
        if "proj_out" in map(str, path):
            key, sub = jax.random.split(key)
            var.set_value(0.1 * jax.random.normal(sub, var.get_value().shape))
    nnx.update(model, nnx.from_flat_state(flat))
    out = _jit_forward(model, batch)
    ours = model.image_nll(out)[0, 0]

    tokens = batch["tokens"][0]
    vs = int(np.flatnonzero(tokens == model.cfg.vlm.vision_start_token_id)[0])
    big_l = model.cfg.latents_per_image
    context = out["y_vlm"][:, :vs]
    pos = jnp.asarray(batch["positions"])
    positions = jnp.concatenate([pos[:, :vs], pos[:, vs : vs + big_l]], axis=1)
    x = jnp.asarray(batch["latents"][:, 0])
    u, shallow_ld = model.shallow_forward(x)
    z, deep_ld = model.deep.forward(u, context, None, positions)
    theirs = nll_per_dim(z, deep_ld + shallow_ld)[0]
    np.testing.assert_allclose(float(ours), float(theirs), rtol=2e-6)
    # The per-slot deep terms: on the latent slots only, summing to the deep block's NLL.
    slots = np.asarray(tokens == model.cfg.vlm.image_token_id)
    per_slot = np.asarray(out["deep_nll"][0])
    assert np.all(per_slot[~slots] == 0) and np.all(per_slot[slots] != 0)
    deep_total = 0.5 * float(jnp.sum(jnp.square(z[0]))) - float(deep_ld[0])
    np.testing.assert_allclose(per_slot.sum(), deep_total, rtol=2e-5)
    assert abs(float(ours) - float(nll_per_dim(x, jnp.zeros(1))[0])) > 1e-3


def _stream_outputs(model, tokens, u_seq, positions, seg, branch):
    out = model.streams(tokens, u_seq, positions, seg, branch)
    return model.logits(out["hidden"]), out["a"], out["mu"]


@pytest.mark.parametrize("window", [1, 2])
def test_causality_across_streams(tok, lay, window):
    batch = tiny.batch(lay, [[tiny.interleaved_doc(0)]])
    cfg = tiny.config(tok, taps=(-1, 1), adapter_window=window)
    model = tiny.model(cfg, randomize_zero_init=True)
    args = [jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids", "branch_ids")]
    tokens, positions, seg, branch = args
    s = tokens.shape[1]
    u_seq = jnp.asarray(np.random.default_rng(0).normal(size=(1, s, tiny.CHANNELS)), jnp.float32)
    u_seq = jnp.where((tokens == model.cfg.vlm.image_token_id)[..., None], u_seq, 0.0)
    run = jax.jit(lambda t, u: _stream_outputs(model, t, u, positions, seg, branch))
    base = run(tokens, u_seq)
    is_latent = np.asarray(tokens[0] == model.cfg.vlm.image_token_id)
    length = int(np.asarray(seg[0] > 0).sum())
    for t in [3, int(np.flatnonzero(is_latent)[4]), length - 2]:
        if is_latent[t]:
            u2, t2 = u_seq.at[0, t].add(1.0), tokens
        else:
            u2, t2 = u_seq, tokens.at[0, t].set((int(tokens[0, t]) + 1) % 20 + 10)
        moved = run(t2, u2)
        for before, after in zip(base, moved, strict=True):
            np.testing.assert_array_equal(np.asarray(before[0, :t]), np.asarray(after[0, :t]))
            assert np.abs(np.asarray(before[0, t:]) - np.asarray(after[0, t:])).max() > 0


def test_packed_row_equals_documents_alone(tok, lay):
    docs = [tiny.t2i_doc(0), tiny.vqa_doc(1)]
    packed = tiny.batch(lay, [docs], seed=1)
    alone = tiny.batch(lay, [[docs[0]], [docs[1]]], seed=1)
    # The same latents per image: row 0's images are doc 0's then doc 1's.
    alone["latents"][0, 0] = packed["latents"][0, 0]
    alone["latents"][1, 0] = packed["latents"][0, 1]
    model = tiny.model(tiny.config(tok, taps=(-1, 0)), randomize_zero_init=True)
    run = jax.jit(lambda b: model.forward(b, None))
    p = run({k: jnp.asarray(v) for k, v in packed.items()})
    a = run({k: jnp.asarray(v) for k, v in alone.items()})
    seg = packed["segment_ids"][0]
    for doc_id, row in ((1, 0), (2, 1)):
        at = np.flatnonzero(seg == doc_id)
        n = len(at)
        for key in ("hidden", "a", "mu", "z"):
            np.testing.assert_allclose(
                np.asarray(p[key][0, at]), np.asarray(a[key][row, :n]), atol=2e-5, rtol=2e-5
            )
    nll_p, nll_a = np.asarray(model.image_nll(p)), np.asarray(model.image_nll(a))
    np.testing.assert_allclose(nll_p[0, :2], [nll_a[0, 0], nll_a[1, 0]], rtol=1e-5)


@pytest.mark.parametrize(
    "stride, scope, window", [(1, "all", 1), (2, "after_image", 1), (1, "all", 2)]
)
def test_cached_decoding_equals_teacher_forced(tok, stride, scope, window):
    """Text, image, text, image, text in one row, fed one position at a time through the joint
    cache (after a 3-token prefill) against the teacher-forced forward; also with the VLM
    stream on a 2x coarser grid and W_D only after an image, and with the adapter reading 2x2
    windows (the earlier latents of a window come from the cache's history)."""
    lay = tiny.layout(tok, vlm_grid_stride=stride)
    batch = tiny.batch(lay, [[tiny.interleaved_doc(0)]])
    cfg = tiny.config(
        tok, taps=(-1, 0), vlm_grid_stride=stride, w_d_scope=scope, adapter_window=window
    )
    model = tiny.model(cfg, randomize_zero_init=True)
    tokens = jnp.asarray(batch["tokens"])
    positions = jnp.asarray(batch["positions"])
    seg = jnp.asarray(batch["segment_ids"])
    length = int(np.asarray(seg[0] > 0).sum())
    assert int(np.sum(np.asarray(tokens[0, :length]) == model.cfg.vlm.image_token_id)) == 16
    s = tokens.shape[1]
    u_seq = jnp.asarray(np.random.default_rng(0).normal(size=(1, s, tiny.CHANNELS)), jnp.float32)
    u_seq = jnp.where((tokens == model.cfg.vlm.image_token_id)[..., None], u_seq, 0.0)
    full = jax.jit(
        lambda: _stream_outputs(model, tokens, u_seq, positions, seg, jnp.zeros_like(seg))
    )()

    step = jax.jit(lambda t, u, p, c: model.step(t, u, p, c))
    cache = model.init_cache(1, s)
    outs = []
    h, a, mu, cache = step(tokens[:, :3], u_seq[:, :3], positions[:, :3], cache)
    outs.append((h, a, mu))
    for t in range(3, length):
        sl = slice(t, t + 1)
        h, a, mu, cache = step(tokens[:, sl], u_seq[:, sl], positions[:, sl], cache)
        outs.append((h, a, mu))
    assert int(cache.index) == length
    got = [jnp.concatenate(v, axis=1) for v in zip(*outs, strict=True)]
    got[0] = model.logits(got[0])
    for want, have in zip(full, got, strict=True):
        np.testing.assert_allclose(
            np.asarray(have[0]), np.asarray(want[0, :length]), atol=3e-5, rtol=3e-5
        )


def test_adapter_windows_read_the_latents_above_and_left(tok, lay):
    """Window 2: latent (r, c) of each image gets [u(r, c), u(r, c-1), u(r-1, c), u(r-1, c-1)],
    zeros off its image's grid; other slots are not read. The same split over two calls (the
    second continuing from the first's history) gives the same windows."""
    batch = tiny.batch(lay, [[tiny.interleaved_doc(0)]])
    model = tiny.model(tiny.config(tok, adapter_window=2))
    tokens, positions = jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"])
    is_latent = np.asarray(tokens[0] == model.cfg.vlm.image_token_id)
    s, c = tokens.shape[1], tiny.CHANNELS
    u = (
        np.random.default_rng(1).normal(size=(1, s, c)).astype(np.float32)
        * is_latent[None, :, None]
    )
    history = jnp.zeros((1, model.cfg.adapter_history, c))
    win, _ = model.adapter_windows(jnp.asarray(u), positions, history)
    win = np.asarray(win)
    gh, gw = tiny.GRID
    slots = np.flatnonzero(is_latent).reshape(-1, gh, gw)
    assert len(slots) == 2
    for image in slots:
        grid = u[0, image]  # (gh, gw, C)
        for r in range(gh):
            for col in range(gw):
                want = [
                    grid[r - dr, col - dc] if r >= dr and col >= dc else np.zeros(c)
                    for dr in (0, 1)
                    for dc in (0, 1)
                ]
                np.testing.assert_array_equal(win[0, image[r, col]], np.concatenate(want))
    cut = int(slots[1, 1, 2])  # inside the second image, second row
    first, history = model.adapter_windows(jnp.asarray(u[:, :cut]), positions[:, :cut], history)
    second, _ = model.adapter_windows(jnp.asarray(u[:, cut:]), positions[:, cut:], history)
    both = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
    np.testing.assert_array_equal(both[0, is_latent], win[0, is_latent])


def test_vlm_grid_stride_gives_the_vlm_its_own_grid(tok):
    """Stride 2: the VLM reads an image's latents at (p, p + i // 2, p + j // 2) and the text
    after it resumes one past the coarse grid (Qwen's rule on that grid); the deep block keeps
    the fine ids."""
    lay = tiny.layout(tok, vlm_grid_stride=2)
    batch = tiny.batch(lay, [[tiny.interleaved_doc(0)]])
    model = tiny.model(tiny.config(tok, vlm_grid_stride=2))
    tokens, fine = batch["tokens"][0], batch["positions"][0]
    is_latent = tokens == model.cfg.vlm.image_token_id
    ids = np.asarray(model.vlm_positions(jnp.asarray(fine), jnp.asarray(is_latent)))
    gh, gw = tiny.GRID
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], is_latent.astype(int)])) == 1)
    assert len(starts) == 2
    for s in starts:
        p = fine[s, 0]
        np.testing.assert_array_equal(
            fine[s : s + gh * gw], p + np.stack([0 * rows, rows, cols], 1)
        )
        coarse = p + np.stack([0 * rows, rows // 2, cols // 2], 1)
        np.testing.assert_array_equal(ids[s : s + gh * gw], coarse)
        # <vision_end> right after the image: one past the coarse grid's largest id.
        np.testing.assert_array_equal(ids[s + gh * gw], [coarse.max() + 1] * 3)
    np.testing.assert_array_equal(ids[~is_latent], fine[~is_latent])


def test_w_d_after_image_keeps_text_only_logits_the_frozen_vlms(tok, lay):
    """With the coupling trained (random), w_d_scope="after_image" leaves the logits of text-only
    documents and of a document's text before its first image bit-exactly the frozen VLM's;
    after the image W_D acts."""
    batch = tiny.batch(lay, [[tiny.text_doc(0), tiny.t2i_doc(1)], [tiny.interleaved_doc(2)]])
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    model = tiny.model(tiny.config(tok, w_d_scope="after_image"), randomize_zero_init=True)
    ours = np.asarray(jax.jit(lambda b: model.logits(model.forward(b, None)["hidden"]))(jb))
    # The frozen VLM alone, given the same adapter outputs at the latent slots.
    out = jax.jit(lambda b: model.forward(b, None, run_deep=False))(jb)
    alone = np.asarray(model.logits(out["hidden"]))
    tokens, seg = batch["tokens"], batch["segment_ids"]
    is_latent = tokens == model.cfg.vlm.image_token_id
    after = np.zeros_like(is_latent)
    for r in range(len(tokens)):
        for d in np.unique(seg[r][seg[r] > 0]):
            at = np.flatnonzero(seg[r] == d)
            first = at[is_latent[r, at]]
            if len(first):
                after[r, at[at >= first[0]]] = True
    assert after.any() and (~after & (seg > 0)).any()
    np.testing.assert_array_equal(ours[~after], alone[~after])
    assert np.abs(ours[after & ~is_latent] - alone[after & ~is_latent]).min() > 0


def test_loss_by_stage_and_masks(tok, lay):
    batch = tiny.batch(lay, [[tiny.interleaved_doc(0)], [tiny.vqa_doc(1), tiny.t2i_doc(2)]])
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.key(0)
    metrics = {}
    for stage in (1, 2, 3):
        model = tiny.model(tiny.config(tok, stage=stage), randomize_zero_init=True)
        # Stage 2 leaves out the deep stream: W_D is zero until stage 3 trains it.
        model.w_d.kernel.set_value(jnp.zeros_like(model.w_d.kernel[...]))
        model.w_d.bias.set_value(jnp.zeros_like(model.w_d.bias[...]))
        loss, metrics[stage] = jax.jit(model.loss)(jb, key)
        assert np.isfinite(float(loss))
    assert set(metrics[1]) == {"flow_nll", "bits_per_dim", "target_images"}
    assert set(metrics[2]) == {"lm_loss", "lm_accuracy", "target_tokens"}
    # Targets: 2 + 1 images (the vqa image is context), text targets from the masks.
    assert float(metrics[3]["target_images"]) == 3
    assert float(metrics[3]["target_tokens"]) == batch["text_loss_mask"].sum()
    np.testing.assert_allclose(metrics[1]["flow_nll"], metrics[3]["flow_nll"], rtol=1e-6)
    np.testing.assert_allclose(metrics[2]["lm_loss"], metrics[3]["lm_loss"], rtol=1e-6)
    # The per-image NLL of the context image (the vqa one) is not in the loss.
    model = tiny.model(tiny.config(tok, stage=1), randomize_zero_init=True)
    out = jax.jit(lambda b: model.forward(b, None))(jb)
    nll = np.asarray(model.image_nll(out))
    target = batch["image_target"] & batch["image_mask"]
    np.testing.assert_allclose(float(metrics[1]["flow_nll"]), nll[target].mean(), rtol=1e-5)
    assert abs(nll[1, 0] - nll[target].mean()) > 1e-4


def test_pallas_affine_equals_xla_per_image(tok, lay):
    """The fused kernel (interpret mode) gives the XLA path's per-image log-dets, z^2 and loss
    gradients on a packed row of several images and text."""
    import dataclasses

    batch = tiny.batch(lay, [[tiny.interleaved_doc(0)], [tiny.vqa_doc(1), tiny.t2i_doc(2)]])
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    cfg = tiny.config(tok, stage=1)
    fused = tiny.replace(cfg, flow=dataclasses.replace(cfg.flow, affine_impl="pallas"))
    results = []
    for c in (cfg, fused):
        model = tiny.model(c, randomize_zero_init=True)
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            return nnx.merge(graphdef, state).loss(jb, None)

        (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        out = jax.jit(lambda s, g=graphdef: nnx.merge(g, s).forward(jb, None))(state)
        results.append((value, out["image_logdet"], out["image_z2"], out["deep_nll"], grads))
    (v0, ld0, z0, n0, g0), (v1, ld1, z1, n1, g1) = results
    np.testing.assert_allclose(np.asarray(ld1), np.asarray(ld0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(n1), np.asarray(n0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z1), np.asarray(z0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_native_understanding_input_uses_the_towers_features_for_context_images(tok):
    """understanding_input="native": a context image enters the VLM as its own tower's merged
    features (the layout's grid must be the tower's); target images keep the FAE path."""
    import dataclasses

    from pretzel_jax.vlm import VisionConfig

    vision = VisionConfig(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=1,
        window_size=4,
        fullatt_block_indexes=(0,),
        out_hidden_size=32,
    )
    base = tiny.config(tok)
    cfg = tiny.replace(base, vlm=dataclasses.replace(base.vlm, vision=vision))
    lay = tiny.layout(tok, image_size=(4, 8))  # 2x4 tower tokens = the 2x4 latent grid
    batch = tiny.batch(lay, [[tiny.vqa_doc(0), tiny.t2i_doc(1)]])
    batch.pop("latents")  # through the (toy) FAE
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    outs = {}
    for mode in ("fae", "native"):
        model = tiny.model(tiny.replace(cfg, understanding_input=mode), image_size=(4, 8))
        outs[mode] = jax.jit(lambda b, m=model: m.forward(b, None))(jb)
    seg = batch["segment_ids"][0]
    vqa, t2i = np.flatnonzero(seg == 1), np.flatnonzero(seg == 2)
    first_latent = int(np.flatnonzero(batch["tokens"][0] == cfg.vlm.image_token_id)[0])
    assert vqa[0] < first_latent < vqa[-1]
    y_fae, y_native = (np.asarray(outs[m]["y_vlm"][0]) for m in ("fae", "native"))
    np.testing.assert_array_equal(y_fae[:first_latent], y_native[:first_latent])
    assert np.abs(y_fae[vqa[-1]] - y_native[vqa[-1]]).max() > 1e-4  # the context image
    np.testing.assert_array_equal(y_fae[t2i], y_native[t2i])  # the target image's document
    # A layout whose grid is not the tower's is refused with the fix.
    wrong = tiny.batch(tiny.layout(tok), [[tiny.vqa_doc(0)]])
    wrong.pop("latents")
    model = tiny.model(tiny.replace(cfg, understanding_input="native"))
    with pytest.raises(ValueError, match="data.latent_grid"):
        model.forward({k: jnp.asarray(v) for k, v in wrong.items()}, None)
