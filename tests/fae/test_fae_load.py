"""`pretzel_jax.fae.load`: an FAE rebuilt from its fae.safetensors alone (a Qwen vision tower
encoder and a DINOv2 one) gives the saved FAE's tensors and encode/decode outputs; a file
without the encoder's config (the older layout) needs it passed, and says so; a corrupt file
fails with one clear error."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from pretzel_jax import fae
from pretzel_jax.fae import weights
from pretzel_jax.fae.encoders import DinoV2, DinoV2Config, QwenVisionEncoder
from pretzel_jax.fae.model import FAE, FAEConfig
from pretzel_jax.fae.weights import FAEWeightsError
from pretzel_jax.nn import param_file
from pretzel_jax.vlm import VisionConfig
from pretzel_jax.vlm.vision import VisionTower

TOWER = VisionConfig(
    depth=2,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    patch_size=4,
    spatial_merge_size=1,
    window_size=16,
    fullatt_block_indexes=(1,),
    out_hidden_size=16,
)
DINO = DinoV2Config(
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    mlp_ratio=2,
    use_swiglu_ffn=True,
    patch_size=4,
    image_size=32,
    num_register_tokens=2,
)
ENCODERS = {"qwen_vision": TOWER, "dinov2": DINO}


def _fae(kind: str, seed: int = 0) -> FAE:
    rngs = nnx.Rngs(seed)
    if kind == "dinov2":
        encoder = DinoV2(DINO, rngs=rngs)
    else:
        encoder = QwenVisionEncoder(VisionTower(TOWER, rngs=rngs))
    cfg = FAEConfig(
        image_size=32,
        feature_grid=8,
        feature_dim=16,
        latent_channels=4,
        encoder_heads=2,
        decoder_depth=1,
        decoder_heads=2,
        pixel_depth=1,
        pixel_width=16,
        pixel_heads=2,
        output_size=32,
        gan_weight=0.1,  # the discriminator's tensors travel too
    )
    model = FAE(cfg, encoder, rngs=rngs)
    # Non-trivial latent statistics (they are part of what encode/decode compute).
    model.latent_norm["mean"][...] = jax.random.normal(jax.random.key(seed), (4,))
    model.latent_norm["std"][...] = 0.5 + jax.random.uniform(jax.random.key(seed + 1), (4,))
    return model


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def saved(request, tmp_path_factory):
    kind = request.param
    model = _fae(kind)
    path = weights.save(model, tmp_path_factory.mktemp(kind) / "fae.safetensors")
    return kind, model, path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def _outputs(model, images):
    z = nnx.jit(lambda m, x: m.encode(x))(model, images)
    return np.asarray(z), np.asarray(nnx.jit(lambda m, z: m.decode(z))(model, z))


def _assert_same(model, loaded, images):
    ours, theirs = weights.flat_params(model), weights.flat_params(loaded)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    for a, b in zip(_outputs(model, images), _outputs(loaded, images), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_rebuilds_the_saved_fae(saved, images):
    kind, model, path = saved
    config, encoder = weights.read_metadata(path)
    assert encoder["kind"] == kind
    loaded = fae.load(path)
    assert loaded.cfg == model.cfg
    enc_cfg = loaded.encoder.cfg if kind == "dinov2" else loaded.encoder.tower.cfg
    assert enc_cfg == ENCODERS[kind]
    _assert_same(model, loaded, images)


def test_a_file_without_encoder_metadata_needs_the_config(saved, images, tmp_path):
    kind, model, _ = saved
    old = param_file.save(model, tmp_path / "old.safetensors", weights.FORMAT)  # older layout
    assert weights.read_metadata(old)[1] is None
    with pytest.raises(FAEWeightsError, match=r"old.safetensors.*encoder_config=") as e:
        fae.load(old)
    assert "do not record their encoder's config" in str(e.value)
    _assert_same(model, fae.load(old, encoder_config=ENCODERS[kind]), images)
    as_dict = {"kind": kind, "config": dataclasses.asdict(ENCODERS[kind])}
    _assert_same(model, fae.load(old, encoder_config=as_dict), images)


def test_a_wrong_encoder_config_fails_on_the_tensors(saved):
    kind, _, path = saved
    wrong = dataclasses.replace(ENCODERS[kind], hidden_size=32)
    with pytest.raises(FAEWeightsError, match=r"do not fit this model"):
        fae.load(path, encoder_config=wrong)
    with pytest.raises(FAEWeightsError, match=r"encoder kind 'vit' is unknown"):
        fae.load(path, encoder_config={"kind": "vit", "config": {}})
    with pytest.raises(FAEWeightsError, match=r"must be a DinoV2Config"):
        fae.load(path, encoder_config="dinov2")


def test_corrupt_and_foreign_files_fail_with_one_clear_error(saved, tmp_path):
    _, model, path = saved
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    truncated = tmp_path / "truncated.safetensors"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for bad in (garbage, truncated):
        with pytest.raises(FAEWeightsError, match=r"truncated or corrupt") as e:
            fae.load(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(FAEWeightsError, match=r"do not exist"):
        fae.load(tmp_path / "nowhere.safetensors")
    with pytest.raises(FAEWeightsError, match=r"never a pickle"):
        fae.load(tmp_path / "fae.pt")
    foreign = param_file.save(model, tmp_path / "foreign.safetensors", "other/1")
    with pytest.raises(FAEWeightsError, match=r"is not a file of FAE weights"):
        fae.load(foreign)
