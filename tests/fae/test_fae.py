"""FAE: encode/decode shapes, KL formula, latent normalisation, the paper-scale config by
eval_shape, and clear errors for bad encoder / FAE weight files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax import models
from pretzel_jax.eval.fae_report import latent_stats, set_latent_stats
from pretzel_jax.fae import weights
from pretzel_jax.fae.model import FROZEN, kl_divergence
from pretzel_jax.train.config import load_config
from pretzel_jax.train.errors import ConfigError

TOY = "experiments/shapes_fae.py:test"


# Every loss term on (the `:test` size leaves the perceptual loss and the GAN off).
ALL_LOSSES = ("model.fae.perceptual_weight=0.1", "model.fae.gan_weight=0.1")


def _config(*overrides):
    overrides = [*ALL_LOSSES, *overrides]
    return load_config(TOY, overrides=overrides, device_count=1, process_count=1)


def _abstract(config):
    return nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))


def _build(config, seed=0):
    return nnx.jit(lambda: models.build(config, rngs=nnx.Rngs(seed)))()


@pytest.fixture(scope="module")
def fae():
    return _build(_config())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


def test_encode_decode_shapes_and_input_types(fae, images):
    cfg = fae.cfg
    assert (cfg.feature_grid, cfg.feature_dim) == (8, 16)  # 4 px patches: 8x8x16 features
    z = nnx.jit(lambda m, x: m.encode(x))(fae, images)
    assert z.shape == (8, 8, 8, cfg.latent_channels) and z.dtype == jnp.float32
    as_float = images.astype(np.float32) / 255.0
    np.testing.assert_allclose(nnx.jit(lambda m, x: m.encode(x))(fae, as_float), z, atol=1e-5)
    out = nnx.jit(lambda m, z: m.decode(z))(fae, z)
    assert out.shape == (8, 32, 32, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_loss_terms_and_gradients_are_finite(fae, images):
    def loss(model):
        return model.loss({"image": images}, jax.random.key(0))

    (value, metrics), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(fae)
    assert {"feature_l2", "kl", "pixel_l1", "pixel_l2", "perceptual", "gan_g", "gan_d"} <= set(
        metrics
    )
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_kl_matches_hand_computation():
    mean = jnp.array([[0.5, -1.0], [0.0, 2.0]])
    logvar = jnp.array([[0.0, np.log(4.0)], [np.log(0.25), 1.0]])
    # KL(N(m, v) || N(0, 1)) = 0.5 (m^2 + v - 1 - log v), per element, then averaged.
    hand = [
        0.5 * (0.25 + 1 - 1 - 0),
        0.5 * (1 + 4 - 1 - np.log(4.0)),
        0.5 * (0 + 0.25 - 1 - np.log(0.25)),
        0.5 * (4 + np.e - 1 - 1),
    ]
    np.testing.assert_allclose(kl_divergence(mean, logvar), np.mean(hand), rtol=1e-6)
    assert float(kl_divergence(jnp.zeros(3), jnp.zeros(3))) == 0.0


def test_normalisation_stats_give_unit_variance_on_their_data(fae, images):
    batches = [{"image": images[:4]}, {"image": images[4:]}]
    mean, std = latent_stats(fae, batches)
    before = (fae.latent_norm["mean"][...], fae.latent_norm["std"][...])
    set_latent_stats(fae, mean, std)
    try:
        z = np.asarray(nnx.jit(lambda m, x: m.encode(x))(fae, images)).reshape(
            -1, fae.cfg.latent_channels
        )
    finally:
        set_latent_stats(fae, *before)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.var(0), 1.0, rtol=1e-3)


def test_weights_round_trip_and_pixel_adapt_init(fae, tmp_path):
    path = weights.save(fae, tmp_path / "fae.safetensors")
    config = _config(
        "model.fae.phase=pixel_adapt",
        f"model.fae.init_from={path}",
        "optim.freeze=" + repr(list(FROZEN["pixel_adapt"])),
    )
    adapted = _build(config, seed=1)  # another seed: every weight from the file
    ours, theirs = weights.flat_params(fae), weights.flat_params(adapted)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_phase_frozen_parts_must_be_frozen():
    with pytest.raises(ConfigError, match=r"optim.freeze holds"):
        models.build(_config("optim.freeze=()"), rngs=nnx.Rngs(0))


def test_bad_fae_weights_file_names_the_file(fae, tmp_path):
    adapt = [
        "model.fae.phase=pixel_adapt",
        "optim.freeze=" + repr(list(FROZEN["pixel_adapt"])),
    ]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match=str(corrupt)) as e:
        _abstract(_config(*adapt, f"model.fae.init_from={corrupt}"))
    assert "corrupt" in str(e.value)
    wrong = weights.save(fae, tmp_path / "fae.safetensors")
    with pytest.raises(ConfigError, match=r"do not fit this model.*latent_encoder/out/kernel"):
        _abstract(_config(*adapt, f"model.fae.init_from={wrong}", "model.fae.latent_channels=4"))


def _tiny_dinov2_folder(path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=4,
        image_size=32,
    )
    transformers.Dinov2Model(cfg).save_pretrained(path)
    return path


def _copy(src, dst, **config_edits):
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(data | config_edits))
    return dst


def test_encoder_checkpoint_errors_name_the_file(tmp_path):
    dino = [
        "model.fae.encoder.kind=dinov2",
        "model.fae.encoder.layers=0",  # the toy config cuts its Qwen tower to one block
        "model.fae.encoder.if_missing=error",
        "model.fae.feature_group=1",
    ]
    good = _tiny_dinov2_folder(tmp_path / "good")
    model = _abstract(_config(*dino, f"model.fae.encoder.path={good}"))
    assert (model.cfg.feature_grid, model.cfg.feature_dim) == (8, 16)

    corrupt = _copy(good, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"model.safetensors"):
        _abstract(_config(*dino, f"model.fae.encoder.path={corrupt}"))

    mismatched = _copy(good, tmp_path / "mismatched", hidden_size=32)
    with pytest.raises(ConfigError, match=str(mismatched)):
        _abstract(_config(*dino, f"model.fae.encoder.path={mismatched}"))

    with pytest.raises(ConfigError, match=r"no dinov2 encoder there.*if_missing=random"):
        models.build(
            _config(*dino, f"model.fae.encoder.path={tmp_path / 'nowhere'}"), rngs=nnx.Rngs(0)
        )


def test_paper_scale_config_by_eval_shape():
    config = load_config(
        "experiments/fae_dinov2g.py",
        overrides=["model.fae.encoder.if_missing=random"],
        device_count=1,
        process_count=1,
    )
    model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))
    cfg = model.cfg
    assert (cfg.feature_grid, cfg.feature_dim, cfg.latent_channels) == (16, 1536, 32)
    graphdef, state = nnx.split(model)
    image = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    z = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, image)
    assert z.shape == (2, 16, 16, 32)
    out = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, z)
    assert out.shape == (2, 256, 256, 3)
    counts = {
        k: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(getattr(model, k))))
        for k in ("encoder", "latent_encoder", "feature_decoder", "pixel_decoder")
    }
    assert 1.1e9 < counts["encoder"] < 1.2e9  # DINOv2-g/14: 1.14B
    assert counts["latent_encoder"] < 0.03e9  # "one layer is enough"


def test_features_are_standardised_per_patch_unless_turned_off(fae, images):
    features = nnx.jit(lambda m, x: m.features(x / 255.0))
    normed = np.asarray(features(fae, images))
    np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(normed.std(-1), 1.0, atol=1e-4)
    raw = np.asarray(features(_build(_config("model.fae.feature_norm=False")), images))
    assert not np.allclose(raw.std(-1), 1.0, atol=1e-2)
    centred = raw - raw.mean(-1, keepdims=True)
    np.testing.assert_allclose(normed, centred / centred.std(-1, keepdims=True), atol=1e-4)


def test_encoder_layers_runs_the_first_blocks_of_the_loaded_tower(tmp_path, images):
    from pretzel_jax.convert import hf_qwen25vl

    stage0 = load_config("experiments/shapes_stage0_vlm.py:test", device_count=1, process_count=1)
    vlm = models.build(stage0, rngs=nnx.Rngs(1))
    blocks = vlm.vision.blocks
    assert blocks.norm1.scale.value.shape[0] == 2
    # Block 1 becomes an identity (both residual branches write zeros), so the whole tower's
    # features are its first block's: taking the last block or random weights would differ.
    for branch in (blocks.attn.proj, blocks.mlp.down):
        branch.kernel.value = branch.kernel.value.at[1:].set(0.0)
        branch.bias.value = branch.bias.value.at[1:].set(0.0)
    hf_qwen25vl.save(vlm, tmp_path / "vlm")
    qwen = ["model.fae.encoder.if_missing=error", f"model.fae.encoder.path={tmp_path / 'vlm'}"]
    features = nnx.jit(lambda m, x: m.features(x / 255.0))
    whole = np.asarray(features(_build(_config(*qwen, "model.fae.encoder.layers=0")), images))
    first = _build(_config(*qwen, "model.fae.encoder.layers=1"))
    assert first.encoder.tower.cfg.depth == 1
    np.testing.assert_allclose(np.asarray(features(first, images)), whole, atol=1e-5)
    with pytest.raises(ConfigError, match=r"encoder.layers=3 but the tower has 2 blocks"):
        _abstract(_config(*qwen, "model.fae.encoder.layers=3"))


def _feature_decoder_input_noise(model, images):
    """(what the feature decoder gets in the loss - the posterior mean) / the mean's per-channel
    std over the batch and positions."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        seen, decoder = [], m.feature_decoder
        m.feature_decoder = lambda z: (seen.append(z), decoder(z))[1]
        mean, _ = m.latent_encoder(m.features(images / 255.0))
        m.loss({"image": images}, jax.random.key(0))
        return (seen[-1] - mean) / mean.std(axis=(0, 1))

    return np.asarray(run(state))


def test_latent_noise_reaches_the_feature_decoder_at_its_scale(images):
    fae = _build(_config("model.fae.latent_noise=0.3"))
    out, c = fae.latent_encoder.out, fae.cfg.latent_channels
    # Posterior noise off (log-variance -30): beyond the posterior mean, the feature decoder
    # gets the augmentation alone.
    out.kernel.value = out.kernel.value.at[:, c:].set(0.0)
    out.bias.value = out.bias.value.at[c:].set(-30.0)
    assert abs(float(_feature_decoder_input_noise(fae, images).std()) - 0.3) < 0.03
    fae.cfg = dataclasses.replace(fae.cfg, latent_noise=0.0)
    assert float(np.abs(_feature_decoder_input_noise(fae, images)).max()) < 1e-4
