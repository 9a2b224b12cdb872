"""Vision-tower pretraining on dense labels: the cell pooling is overlap-weighted, each token's
labels are those of the cell holding its centre, ignored labels cost nothing, the heads learn a
fixed batch, and the tower file round-trips into a VLM."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pretzel_jax.nn import param_file
from pretzel_jax.vlm import VisionConfig, VisionTower
from pretzel_jax.vlm.tower_pretrain import (
    TowerPretrain,
    TowerPretrainConfig,
    cell_pooling,
    load_tower,
    save_tower,
    token_cells,
)

VISION = VisionConfig(
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
CFG = TowerPretrainConfig(VISION, image_size=32, cell_grid=3, cell_classes=(5, 6, 2))


def _model(seed=0, cfg=CFG):
    return nnx.jit(lambda: TowerPretrain(cfg, rngs=nnx.Rngs(seed)))()


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    cells = np.stack(
        [rng.integers(0, 5, (n, 9)), rng.integers(0, 6, (n, 9)), rng.integers(0, 2, (n, 9))], -1
    )
    cells[..., 1:][cells[..., 0] == 0] = -1  # empty cells have no colour or size
    images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
    return {"image": jnp.asarray(images), "cells": jnp.asarray(cells, jnp.int32)}


def test_cell_pooling_weights_tokens_by_shared_area():
    w = cell_pooling(32, 8, 3)
    assert w.shape == (9, 64)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    # Cell 0 covers pixels [0, 32/3): tokens 0-1 (pixels 0-8) wholly, token 2 (8-12) for 8/3 px.
    row = np.array([4, 4, 8 / 3, 0, 0, 0, 0, 0])
    want = np.outer(row, row).ravel()
    np.testing.assert_allclose(w[0], want / want.sum(), rtol=1e-6)
    # The centre cell [32/3, 64/3) takes token 2 for 4/3 px, tokens 3-4 wholly, token 5 for 4/3.
    row = np.array([0, 0, 4 / 3, 4, 4, 4 / 3, 0, 0])
    want = np.outer(row, row).ravel()
    np.testing.assert_allclose(w[4], want / want.sum(), rtol=1e-6)


def test_token_cells_hold_token_centres():
    # Token centres at 2, 6, ..., 30 px; cell edges at 32/3 and 64/3 px.
    owner = token_cells(32, 8, 3).reshape(8, 8)
    axis = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(owner, axis[:, None] * 3 + axis[None, :])


def test_token_cell_loss_is_the_cell_head_on_each_token():
    batch = _batch()
    plain = _model(0, dataclasses.replace(CFG, token_cell_weight=0.0))
    both = _model(0, dataclasses.replace(CFG, token_cell_weight=0.5))
    loss = nnx.jit(lambda m, b: m.loss(b, None))
    (l0, m0), (l1, m1) = loss(plain, batch), loss(both, batch)
    _, _, token_logits = both(batch["image"])
    labels = np.asarray(batch["cells"])[:, token_cells(32, 8, 3)]  # (B, 64, 3)
    want, start = 0.0, 0
    for i, n in enumerate(CFG.cell_classes):
        logp = jax.nn.log_softmax(np.asarray(token_logits)[..., start : start + n])
        y = labels[..., i]
        picked = np.take_along_axis(np.asarray(logp), np.maximum(y, 0)[..., None], -1)[..., 0]
        want += -picked[y >= 0].mean()
        start += n
    assert float(l1) - float(l0) == pytest.approx(0.5 * want, rel=1e-4)
    assert "token_cell_accuracy_0" in m1 and "token_cell_accuracy_0" not in m0


def test_ignored_labels_cost_nothing():
    model, batch = _model(), _batch()
    batch["cells"] = batch["cells"].at[..., 0].set(0).at[..., 1:].set(-1)  # every cell empty
    loss = nnx.jit(lambda m, b: m.loss(b, None)[0])
    bias = model.cell_head.bias.value
    base = float(loss(model, batch))
    model.cell_head.bias.value = bias.at[5:].add(jnp.arange(8.0))  # colour and size logits
    assert float(loss(model, batch)) == pytest.approx(base, rel=1e-6)
    model.cell_head.bias.value = bias.at[:5].add(jnp.arange(5.0))  # shape logits
    assert float(loss(model, batch)) != pytest.approx(base, rel=1e-3)


def test_heads_and_tower_learn_a_fixed_batch():
    model, batch = _model(), _batch(n=8)
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt):
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: nnx.merge(graphdef, p).loss(batch, None), has_aux=True
        )(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss, metrics

    opt = tx.init(params)
    tower0 = jax.tree.map(np.asarray, nnx.state(model.tower, nnx.Param).to_pure_dict())
    first = None
    for _ in range(60):
        params, opt, loss, metrics = step(params, opt)
        first = float(loss) if first is None else first
    assert float(loss) < 0.3 * first, (first, float(loss))
    assert float(metrics["position_accuracy"]) > 0.5  # chance: 1/64
    tower = nnx.state(nnx.merge(graphdef, params).tower, nnx.Param).to_pure_dict()
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), tower, tower0)
    assert min(jax.tree.leaves(moved)) > 0  # the tower trains, not only the heads


def test_tower_file_round_trips_and_bad_files_say_what_to_do(tmp_path):
    model = _model(0)
    path = save_tower(model.tower, tmp_path / "tower.safetensors")
    other = _model(1)
    load_tower(other.tower, path)
    want, got = param_file.flat_params(model.tower), param_file.flat_params(other.tower)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(param_file.ParamFileError, match=r"do not exist; train it with"):
        load_tower(other.tower, tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(param_file.ParamFileError, match=r"truncated or corrupt"):
        load_tower(other.tower, corrupt)
    # A VLM that merges 2x2 patches takes the blocks and keeps its own (wider) merger.
    merging = VisionTower(
        dataclasses.replace(VISION, spatial_merge_size=2, window_size=32), rngs=nnx.Rngs(2)
    )
    merger0 = param_file.flat_params(merging.merger)
    with pytest.raises(param_file.ParamFileError, match=r"shape mismatches.*merger"):
        load_tower(merging, path)
    load_tower(merging, path, merger=False)
    got = param_file.flat_params(merging)
    for k in want:
        if k.startswith("merger/"):
            np.testing.assert_array_equal(got[k], merger0[k.split("/", 1)[1]])
        else:
            np.testing.assert_array_equal(got[k], want[k])
    wide = VisionConfig(**{**VISION.__dict__, "hidden_size": 32, "intermediate_size": 64})
    bigger = nnx.jit(lambda: TowerPretrain(TowerPretrainConfig(wide), rngs=nnx.Rngs(0)))()
    with pytest.raises(param_file.ParamFileError, match=r"shape mismatches.*model.vlm.vision"):
        load_tower(bigger.tower, path)
