"""Representation encoders: DINOv2's config from config.json, its position resampling against
torch's bicubic resize, the DINOv2-g/14 parameter count against transformers, and the Qwen2.5-VL
vision tower's pre-merger features against transformers. (DINOv2 forward parity with imported
weights: tests/convert/test_hf_dinov2.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.vision_utils import get_vision_window_index

from pretzel_jax.convert import hf_qwen25vl
from pretzel_jax.fae.encoders import DinoV2, DinoV2Config, QwenVisionEncoder, resize_matrix
from pretzel_jax.vlm.image_processing import patchify
from tests.vlm import hf_tiny

# facebook/dinov2-giant's config.json (hub), and the with-registers giant's.
GIANT_HF = {
    "architectures": ["Dinov2Model"],
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 1536,
    "image_size": 518,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "layerscale_value": 1.0,
    "mlp_ratio": 4,
    "model_type": "dinov2",
    "num_attention_heads": 24,
    "num_channels": 3,
    "num_hidden_layers": 40,
    "patch_size": 14,
    "qkv_bias": True,
    "torch_dtype": "float32",
    "transformers_version": "4.31.0.dev0",
    "use_swiglu_ffn": True,
}
GIANT_REG_HF = {
    **GIANT_HF,
    "architectures": ["Dinov2WithRegistersModel"],
    "model_type": "dinov2_with_registers",
    "num_register_tokens": 4,
}


def n_params(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize(
    ("hf", "model_cls", "config_cls"),
    [
        (GIANT_HF, transformers.Dinov2Model, transformers.Dinov2Config),
        (
            GIANT_REG_HF,
            transformers.Dinov2WithRegistersModel,
            transformers.Dinov2WithRegistersConfig,
        ),
    ],
    ids=["giant", "giant-registers"],
)
def test_giant_parameter_count_matches_transformers(hf, model_cls, config_cls):
    cfg = DinoV2Config.from_hf(hf)
    ours = n_params(nnx.eval_shape(lambda: DinoV2(cfg, rngs=nnx.Rngs(0))))
    kw = {k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")}
    with torch.device("meta"):
        theirs = model_cls(config_cls(**kw)).num_parameters()
    print(f"DINOv2-g/14 ({hf['model_type']}) parameters: ours {ours:,}, transformers {theirs:,}")
    assert ours == theirs
    assert cfg.mlp_hidden == 4096


def test_config_from_hf():
    assert DinoV2Config.from_hf(GIANT_HF) == DinoV2Config()  # the defaults are DINOv2-g/14
    reg = DinoV2Config.from_hf(GIANT_REG_HF, param_dtype="bfloat16")
    assert reg.num_register_tokens == 4 and reg.interpolate_antialias and reg.use_mask_token
    assert reg.param_dtype == "bfloat16" and not DinoV2Config().interpolate_antialias
    assert DinoV2Config.from_hf({**GIANT_HF, "image_size": [224, 224]}).grid == 16
    with pytest.raises(ValueError, match=r"\['num_key_value_heads'\] are not supported"):
        DinoV2Config.from_hf({**GIANT_HF, "num_key_value_heads": 8})
    with pytest.raises(ValueError, match="image_size .* is not square"):
        DinoV2Config.from_hf({**GIANT_HF, "image_size": [224, 448]})
    with pytest.raises(ValueError, match="model_type 'vit' is not a DINOv2"):
        DinoV2Config.from_hf({**GIANT_HF, "model_type": "vit"})
    with pytest.raises(ValueError, match="num_register_tokens 4 with model_type 'dinov2'"):
        DinoV2Config.from_hf({**GIANT_HF, "num_register_tokens": 4})
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        DinoV2Config.from_hf({**GIANT_HF, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DinoV2Config(hidden_size=100, num_heads=24)


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_matches_torch_bicubic(antialias):
    """R_h @ X @ R_w.T is F.interpolate(bicubic, align_corners=False[, antialias]) for up- and
    downsampling, square and not; the two modes use different kernels."""
    x = torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    for out in [(7, 7), (3, 4), (5, 9), (12, 16), (16, 3), (1, 2)]:
        want = torch.nn.functional.interpolate(
            x, size=out, mode="bicubic", align_corners=False, antialias=antialias
        ).numpy()
        rh, rw = resize_matrix(7, out[0], antialias), resize_matrix(7, out[1], antialias)
        got = np.einsum("hi,wj,bcij->bchw", rh, rw, x.numpy())
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(out))
    assert np.abs(resize_matrix(7, 12, True) - resize_matrix(7, 12, False)).max() > 0.01


def test_dinov2_rejects_bad_images():
    cfg = DinoV2Config(hidden_size=8, num_layers=1, num_heads=2, image_size=28)
    model = nnx.eval_shape(lambda: DinoV2(cfg, rngs=nnx.Rngs(0)))  # checks come first
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        model.encode(jnp.zeros((1, 30, 28, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        model.encode(jnp.zeros((1, 28, 28, 1)))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(transformers' tiny Qwen2.5-VL vision tower, QwenVisionEncoder over our import of it)."""
    hf = hf_tiny.tiny_qwen25vl(seed=5)
    path = tmp_path_factory.mktemp("qwen25vl")
    hf.save_pretrained(str(path), safe_serialization=True)
    return hf.model.visual, QwenVisionEncoder(hf_qwen25vl.load(path).vision)


@jax.jit
def qwen_encode(graphdef, state, images):
    return nnx.merge(graphdef, state).encode(images)


def test_qwen_encoder_is_the_tower_before_its_merger(qwen):
    """encode(images) = transformers' last block output (`last_hidden_state`, before the
    merger), placed on the patch grid. The reference input comes from the image processor's
    `patchify`, and each feature is placed by the patch coordinates that patchify carries, so
    neither the patch order nor the grid layout is taken from the code under test."""
    visual, encoder = qwen
    b, (hh, ww), p = 2, (56, 84), 14  # 4 x 6 patches: 2 x 3 merge blocks, windows of 2 x 2
    images = np.random.default_rng(0).standard_normal((b, hh, ww, 3)).astype(np.float32)
    pv = np.concatenate([patchify(im, p, 2, 2) for im in images])
    grid = torch.tensor([[1, hh // p, ww // p]] * b)
    with torch.no_grad():
        out = visual(torch.from_numpy(pv), grid_thw=grid)
    window_index, _ = get_vision_window_index(
        grid, spatial_merge_size=2, window_size=visual.window_size, patch_size=p
    )
    perm = (window_index.numpy()[:, None] * 4 + np.arange(4)).ravel()  # window <- processor
    hf_feats = out.last_hidden_state.numpy()[np.argsort(perm)]  # processor order
    rows, cols = np.mgrid[0 : hh // p, 0 : ww // p]
    coords = np.stack([rows, cols, rows], -1).repeat(p, 0).repeat(p, 1).astype(np.float32)
    where = patchify(coords, p, 2, 2)[:, [0, 2 * p * p]].astype(int)  # (row, col) per patch
    want = np.zeros((b, hh // p, ww // p, hf_feats.shape[-1]), np.float32)
    n = len(where)
    for i in range(b):
        want[i, where[:, 0], where[:, 1]] = hf_feats[i * n : (i + 1) * n]

    got = np.asarray(qwen_encode(*nnx.split(encoder), jnp.asarray(images)))
    assert got.shape == want.shape == (b, 4, 6, encoder.feature_dim)
    assert encoder.feature_dim == hf_tiny.VISION_KW["hidden_size"]  # not out_hidden_size
    print(f"max abs err {np.abs(got - want).max():.2e} (features up to {np.abs(want).max():.1f})")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="multiples of patch_size \\* spatial_merge_size = 28"):
        encoder.encode(jnp.zeros((1, 42, 56, 3)))
