"""Hugging Face DINOv2 folders -> DinoV2: parity with transformers' Dinov2Model (GELU MLP and
SwiGLU) and Dinov2WithRegistersModel on tiny random models, at the pretraining size and at
resampled sizes, and the errors a user can cause."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from pretzel_jax.convert import hf_dinov2  # noqa: E402
from pretzel_jax.convert.safetensors_io import ConversionError  # noqa: E402

TOL = 1e-4  # ours vs torch, fp32
# 56 px is the 4 x 4 pretraining grid.
KW = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    mlp_ratio=4,
    image_size=56,
    patch_size=14,
)
VARIANTS = {
    "mlp": (transformers.Dinov2Config, transformers.Dinov2Model, {}),
    "swiglu": (transformers.Dinov2Config, transformers.Dinov2Model, {"use_swiglu_ffn": True}),
    "registers": (
        transformers.Dinov2WithRegistersConfig,
        transformers.Dinov2WithRegistersModel,
        {"num_register_tokens": 3, "qkv_bias": False},
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter with real spread (HF's init leaves norms at 1, biases at 0 and the
    layer scale constant, which would hide a dropped or misplaced one): weights with std
    1/sqrt(fan_in), biases 0.1, norm weights around 1, layer scales around 0.5 with both signs
    possible, and the tokens and position table with std 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.startswith("embeddings.") and "patch_embeddings" not in name:
            p.copy_(noise)
        elif p.ndim >= 2:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif name.endswith("lambda1"):
            p.copy_(0.5 + 0.4 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(1.0 + 0.2 * noise)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, our import of its save_pretrained folder, the folder)."""
    config_cls, model_cls, extra = VARIANTS[request.param]
    torch.manual_seed(0)
    hf = randomize_(model_cls(config_cls(**KW, **extra)).eval(), seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, hf_dinov2.load(path), path


# The pretraining size (4 x 4 patches) and resampled sizes (one compile each): plain bicubic
# upsampling, plain bicubic down in one axis and up in the other, and the registers model's
# antialiased resampling (a different cubic kernel) the same way.
CASES = [
    ("mlp", (56, 56)),
    ("mlp", (84, 84)),
    ("swiglu", (42, 70)),
    ("registers", (42, 70)),
]


@jax.jit
def forward(graphdef, state, pixels, mask):
    """encode (patch grid and CLS) of the batch unmasked and masked, stacked as one batch."""
    model = nnx.merge(graphdef, state)
    both = jnp.concatenate([pixels, pixels])
    return model.encode(both, mask=jnp.concatenate([mask * False, mask]), return_cls=True)


@pytest.mark.parametrize(
    ("pair", "size"), CASES, indirect=["pair"], ids=[f"{v}-{h}x{w}" for v, (h, w) in CASES]
)
def test_matches_transformers(pair, size):
    """encode's patch grid and CLS are transformers' last hidden state, also with masked
    patches (the mask token, as bool_masked_pos)."""
    hf, ours, _ = pair
    h, w = size[0] // 14, size[1] // 14
    rng = np.random.default_rng(sum(size))
    x = rng.standard_normal((2, 3, *size)).astype(np.float32)
    mask = rng.random((2, h, w)) < 0.4
    with torch.no_grad():
        plain = hf(torch.from_numpy(x)).last_hidden_state.numpy()
        tmask = torch.from_numpy(mask.reshape(2, -1))
        masked = hf(torch.from_numpy(x), bool_masked_pos=tmask).last_hidden_state.numpy()
    assert np.abs(masked - plain).max() > 0.1  # the mask token changes the result
    want = np.concatenate([plain, masked])
    r = ours.cfg.num_register_tokens
    assert want.shape == (4, 1 + r + h * w, 32)
    want_feats, want_cls = want[:, 1 + r :].reshape(4, h, w, 32), want[:, 0]
    feats, cls = map(
        np.asarray, forward(*nnx.split(ours), *map(jnp.asarray, (x.transpose(0, 2, 3, 1), mask)))
    )
    print(
        f"{size}: max abs err CLS {np.abs(cls - want_cls).max():.2e}, "
        f"patches {np.abs(feats - want_feats).max():.2e}"
    )
    np.testing.assert_allclose(feats, want_feats, atol=TOL, rtol=0)
    np.testing.assert_allclose(cls, want_cls, atol=TOL, rtol=0)


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = safetensors.numpy.load_file(str(src / "model.safetensors"))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("pair", ["mlp"], indirect=True)
def test_import_errors_name_the_tensor(pair, tmp_path):
    _, _, path = pair
    name = "encoder.layer.1.norm2.weight"

    def drop(t):
        del t[name]

    with pytest.raises(ConversionError, match=rf"missing tensor {name} \[32\]"):
        hf_dinov2.load(_rewrite(path, tmp_path / "missing", drop))

    def reshape(t):
        t["embeddings.position_embeddings"] = t["embeddings.position_embeddings"][:, :-1]

    with pytest.raises(ConversionError, match=r"position_embeddings has shape \[1, 16, 32\]"):
        hf_dinov2.load(_rewrite(path, tmp_path / "shape", reshape))

    def extra(t):
        t["classifier.weight"] = np.zeros((10, 64), np.float32)

    with pytest.raises(ConversionError, match=r"unexpected tensor classifier.weight \[10, 64\]"):
        hf_dinov2.load(_rewrite(path, tmp_path / "extra", extra))


@pytest.mark.parametrize("pair", ["mlp"], indirect=True)
def test_config_errors(pair, tmp_path):
    _, _, path = pair
    config = json.loads((path / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**config, "use_rope": True}))
    with pytest.raises(ConversionError, match=r"config.json.*\['use_rope'\] are not supported"):
        hf_dinov2.load(bad)
    (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ConversionError, match="hidden_act 'relu' is not supported"):
        hf_dinov2.load(bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match=r"missing tensor encoder\.layer\.2\.norm1\.weight"):
        hf_dinov2.load(bad)
    with pytest.raises(ConversionError, match="config.json does not exist"):
        hf_dinov2.load(tmp_path / "nowhere")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="pickled weights"):
        hf_dinov2.load(bad)
