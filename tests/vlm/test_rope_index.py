"""rope_index equals transformers' Qwen2_5_VLModel.get_rope_index, and decode positions equal what
HF generate feeds the language model."""

import numpy as np
import pytest
import torch

from pretzel_jax.vlm.rope_index import decode_positions, rope_index
from tests.vlm.hf_tiny import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    tiny_qwen25vl,
)

MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
    return tiny_qwen25vl(seed=0)


def image(grid):
    n = int(np.prod(grid)) // MERGE**2
    return [VISION_START_TOKEN_ID, *[IMAGE_TOKEN_ID] * n, VISION_END_TOKEN_ID]


def text(rng, n):
    return list(rng.integers(0, 900, n))


def batch(seqs, side):
    """Pad token lists to one length on `side` -> (ids, mask) int64 arrays."""
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), PAD_TOKEN_ID, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for b, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    return ids, mask


def ours(ids, grids, mask):
    return rope_index(
        ids,
        None if grids is None else np.asarray(grids),
        mask,
        spatial_merge_size=MERGE,
        image_token_id=IMAGE_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
    )


def hf(model, ids, grids, mask):
    ids_t = torch.as_tensor(ids)
    pos, deltas = model.model.get_rope_index(
        ids_t,
        mm_token_type_ids=(ids_t == IMAGE_TOKEN_ID).int(),
        image_grid_thw=None if grids is None else torch.as_tensor(grids),
        attention_mask=None if mask is None else torch.as_tensor(mask),
    )
    return pos.permute(1, 2, 0).numpy(), deltas[:, 0].numpy()


def check(model, ids, grids, mask):
    pos, deltas = ours(ids, grids, mask)
    ref_pos, ref_deltas = hf(model, ids, grids, mask)
    assert pos.dtype == np.int32 and pos.shape == (*ids.shape, 3)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    return pos, deltas


def test_text_only(hf_model):
    rng = np.random.default_rng(0)
    ids = np.asarray([text(rng, 9)])
    pos, deltas = check(hf_model, ids, None, None)
    np.testing.assert_array_equal(pos[0], np.repeat(np.arange(9)[:, None], 3, 1))
    assert deltas.tolist() == [0]


def test_one_image_odd_grid(hf_model):
    rng = np.random.default_rng(1)
    grid = [[1, 6, 10]]  # 3 x 5 merged tokens
    ids = np.asarray([text(rng, 3) + image(grid[0]) + text(rng, 4)])
    pos, deltas = check(hf_model, ids, grid, None)
    # The image rows are (4, 4 + i, 4 + j); text after continues from 4 + max(3, 5).
    np.testing.assert_array_equal(pos[0, 4:19, 1], 4 + np.repeat(np.arange(3), 5))
    np.testing.assert_array_equal(pos[0, 19], [9, 9, 9])
    assert deltas[0] == 9 + 5 - ids.shape[1]


def test_two_images_different_odd_grids(hf_model):
    rng = np.random.default_rng(2)
    grids = [[1, 6, 10], [1, 14, 6]]  # 3x5 and 7x3 merged tokens
    ids = np.asarray(
        [text(rng, 2) + image(grids[0]) + text(rng, 3) + image(grids[1]) + text(rng, 5)]
    )
    check(hf_model, ids, grids, None)


def test_temporal_grid_image(hf_model):
    rng = np.random.default_rng(3)
    grids = [[2, 4, 6]]  # t = 2: temporal ids advance, the running position only by max(h, w)
    ids = np.asarray([text(rng, 2) + image(grids[0]) + text(rng, 2)])
    check(hf_model, ids, grids, None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_padding(hf_model, side):
    rng = np.random.default_rng(4)
    grids = [[1, 6, 10], [1, 14, 6], [1, 10, 10]]
    seqs = [
        text(rng, 2) + image(grids[0]) + text(rng, 3) + image(grids[1]) + text(rng, 4),
        text(rng, 7),
        text(rng, 1) + image(grids[2]) + text(rng, 2),
    ]
    ids, mask = batch(seqs, side)
    pos, _ = check(hf_model, ids, grids, mask)
    assert (pos[mask == 0] == 0).all()  # HF 5.x leaves padding at 0


def test_errors_name_the_fix():
    rng = np.random.default_rng(5)
    ids = np.asarray([text(rng, 2) + image([1, 6, 10]) + text(rng, 2)])
    with pytest.raises(ValueError, match="more image tokens"):
        ours(ids, None, None)
    with pytest.raises(ValueError, match="needs 30 image tokens"):
        ours(ids, [[1, 10, 12]], None)
    with pytest.raises(ValueError, match="2 rows"):
        ours(ids, [[1, 6, 10], [1, 6, 10]], None)
    bare = np.asarray([text(rng, 2) + [IMAGE_TOKEN_ID] * 15 + text(rng, 2)])
    with pytest.raises(ValueError, match="vision_start"):
        ours(bare, [[1, 6, 10]], None)


def test_decode_positions_match_hf_generate(hf_model):
    """Capture the position ids HF generate feeds the language model at prefill and each decode
    step (left-padded batch with images), and compare with rope_index / decode_positions."""
    rng = np.random.default_rng(6)
    grids = [[1, 6, 10], [1, 4, 6]]
    seqs = [
        text(rng, 2) + image(grids[0]) + text(rng, 3),
        text(rng, 1) + image(grids[1]) + text(rng, 2) + [VISION_END_TOKEN_ID],
    ]
    ids, mask = batch(seqs, "left")
    n_patches = sum(int(np.prod(g)) for g in grids)
    pixels = torch.randn(n_patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = hf_model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        ids_t = torch.as_tensor(ids)
        with torch.no_grad():
            hf_model.generate(
                input_ids=ids_t,
                attention_mask=torch.as_tensor(mask),
                pixel_values=pixels,
                image_grid_thw=torch.as_tensor(grids),
                mm_token_type_ids=(ids_t == IMAGE_TOKEN_ID).int(),
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
            )
    finally:
        hook.remove()
    assert len(seen) == 4
    pos, deltas = ours(ids, grids, mask)
    np.testing.assert_array_equal(seen[0][1:].permute(1, 2, 0).numpy(), pos)
    n_real = mask.sum(1)
    for step, p in enumerate(seen[1:]):
        hf_step = p[1:, :, -1].T.numpy()
        np.testing.assert_array_equal(decode_positions(pos, mask, step), hf_step)
        # Prompts ending in text: n_real + delta + step on all three axes.
        np.testing.assert_array_equal(hf_step, np.repeat((n_real + deltas + step)[:, None], 3, 1))
