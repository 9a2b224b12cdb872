"""VisionTower vs transformers' Qwen2.5-VL vision tower (`model.visual`) on a tiny random model,
its weights read through the production converter (hf_tiny.converted)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pretzel_jax.vlm.vision import VisionConfig, VisionTower, window_layout
from tests.vlm import hf_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' vision tower, our VisionTower of the same weights, read from the saved
    folder by the production converter: a parameter the name table misses fails the load)."""
    hf = hf_tiny.tiny_qwen25vl(seed=3)
    return hf.model.visual, hf_tiny.converted(hf, tmp_path_factory.mktemp("qwen25vl")).vision


@jax.jit(static_argnums=(0, 3))
def run(graphdef, state, pixel_values, grid):
    return nnx.merge(graphdef, state)(pixel_values, grid)


def pixels(grid, seed):
    n = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32)


@pytest.mark.parametrize(
    "grid",
    [
        ((1, 4, 4),),  # one window, whole image
        ((1, 6, 10),),  # 3 x 5 merge blocks: windows of 2 x 2 blocks cut the image unevenly
        ((1, 10, 6), (1, 2, 2), (1, 8, 8)),  # several images, one a single merge block
        ((2, 6, 4), (1, 4, 6)),  # a two-frame entry: attention per frame
    ],
)
def test_matches_transformers(models, grid):
    visual, tower = models
    assert tower.cfg.merge_window == 2 and hf_tiny.VISION_KW["fullatt_block_indexes"] == [1, 3]
    pv = pixels(grid, seed=sum(map(sum, grid)))
    with torch.no_grad():
        want = visual(torch.from_numpy(pv), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    graphdef, state = nnx.split(tower)
    got = np.asarray(run(graphdef, state, jnp.asarray(pv), grid))
    assert got.shape == want.shape == (len(pv) // 4, tower.cfg.out_hidden_size)
    print(f"max abs err {np.abs(got - want).max():.2e} (outputs up to {np.abs(want).max():.1f})")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The window layers matter: with every layer attending per frame the result changes.
    if grid == ((1, 6, 10),):
        full = dataclasses.replace(tower.cfg, fullatt_block_indexes=(0, 1, 2, 3))
        full_graphdef = nnx.graphdef(nnx.eval_shape(lambda: VisionTower(full, rngs=nnx.Rngs(0))))
        all_full = run(full_graphdef, state, jnp.asarray(pv), grid)
        assert np.abs(np.asarray(all_full) - want).max() > 1e-3
        # Unrolling the block scan (the toy VLM's setting) computes the same tower.
        flat = dataclasses.replace(tower.cfg, unroll_layers=True)
        flat_graphdef = nnx.graphdef(nnx.eval_shape(lambda: VisionTower(flat, rngs=nnx.Rngs(0))))
        unrolled = run(flat_graphdef, state, jnp.asarray(pv), grid)
        np.testing.assert_allclose(np.asarray(unrolled), want, atol=1e-4, rtol=0)


def test_window_layout_segments():
    # Grid 2 frames x (3 x 5) merge blocks, windows of 2 x 2 blocks -> per frame 2 x 3 windows.
    lay = window_layout(((2, 6, 10),), 2, 2)
    units = lay.window_segments[::4]
    assert np.bincount(units).tolist() == [4, 4, 2, 2, 2, 1] * 2
    assert np.all(np.diff(units) >= 0)  # every window is one contiguous run
    assert np.bincount(lay.frame_segments).tolist() == [60, 60]
    # Patches inside one window are spatially close; the inverse undoes the block permutation.
    perm_units = lay.patch_perm[::4] // 4
    np.testing.assert_array_equal(perm_units[lay.unit_inverse], np.arange(30))
    # Padded groups: 12 windows of at most 16 patches; gather then inverse is the identity.
    g = lay.windows
    assert g.index.shape == (12, 16) and g.valid.sum() == 120
    assert g.valid.sum(1).tolist() == [16, 16, 8, 8, 8, 4] * 2
    np.testing.assert_array_equal(g.index.ravel()[g.inverse], np.arange(120))
    np.testing.assert_array_equal(
        lay.window_segments[g.index[g.valid]], np.repeat(range(12), g.valid.sum(1))
    )
    assert lay.frames.index.shape == (2, 60) and lay.frames.valid.all()


def test_param_axes(models):
    _, tower = models
    meta = {
        "/".join(map(str, k)): v.get_metadata().get("out_sharding")
        for k, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))
    }
    assert meta["blocks/attn/qkv/kernel"] == ("layers", "embed", None, "heads")
    assert meta["blocks/mlp/gate/kernel"] == ("layers", "embed", "mlp")
    assert meta["patch_embed/kernel"] == (None, "embed")
    assert meta["merger/fc2/kernel"] == ("mlp", "embed")
    assert all(v is not None for v in meta.values())


def test_bad_inputs(models):
    _, tower = models
    pv = jnp.zeros((16, 1176))
    with pytest.raises(ValueError, match=r"needs \(24, 1176\)"):
        tower(pv, ((1, 4, 6),))
    with pytest.raises(ValueError, match=r"grid_thw\[1\].*multiples of spatial_merge_size"):
        tower(pv, ((1, 2, 2), (1, 3, 4)))
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda g: tower(pv, g))(jnp.array([[1, 4, 4]]))
    with pytest.raises(ValueError, match="window_size"):
        VisionConfig(window_size=20)
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        VisionConfig(depth=4)


def test_7b_parameter_count_matches_transformers():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    tower = nnx.eval_shape(lambda: VisionTower(VisionConfig(), rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(tower, nnx.Param)))
    with torch.device("meta"):
        theirs = Qwen2_5_VisionTransformerPretrainedModel(
            Qwen2_5_VLVisionConfig(hidden_size=1280, out_hidden_size=3584)
        )
    theirs = sum(p.numel() for p in theirs.parameters())
    print(f"7B vision tower parameters: ours {ours:,}, transformers {theirs:,}")
    assert ours == theirs == 676_550_144
