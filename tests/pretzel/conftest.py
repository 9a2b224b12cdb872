"""Shared fixtures of the Pretzel stage tests."""

from __future__ import annotations

import pytest
from flax import nnx

from pretzel_jax import models
from pretzel_jax.data import prepare_dataset
from pretzel_jax.fae import weights as fae_weights
from pretzel_jax.models.pretzel import _fae
from pretzel_jax.train.config import load_config
from pretzel_jax.vlm import Qwen25VL


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data sets, a tiny frozen VLM folder and FAE file (random weights)."""
    root = tmp_path_factory.mktemp("stages")
    data = root / "data"
    for name in ("shapes_captions", "shapes_vqa", "shapes_interleaved", "shapes_edits"):
        prepare_dataset(f"{name}_tiny", str(data))
    config = load_config("experiments/shapes_stage1.py:test", overrides=[f"data.data_dir={data}"])
    vlm = Qwen25VL(models.vlm_config(config.model), nnx.Rngs(1))
    from pretzel_jax.convert.hf_qwen25vl import save

    save(vlm, root / "hf")
    config.unlock()
    config.model.fae.encoder.path = str(root / "hf")
    fae = _fae(config, rngs=nnx.Rngs(2))
    fae_weights.save(fae, root / "fae.safetensors")
    return root
