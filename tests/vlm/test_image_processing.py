"""preprocess_images vs transformers' Qwen2VLImageProcessorPil with Qwen2.5-VL's settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)

from pretzel_jax.vlm.image_processing import (  # noqa: E402
    MAX_PIXELS,
    MIN_PIXELS,
    preprocess_images,
    smart_resize,
)

RNG = np.random.default_rng(0)


def noise(h, w, c=3):
    # Random pixels with a smooth gradient: noise stresses the bicubic taps, the gradient makes a
    # misplaced patch or transposed axis show up.
    ramp = np.add.outer(np.linspace(0, 120, h), np.linspace(0, 100, w))[..., None]
    return np.clip(RNG.integers(0, 136, (h, w, c)) + ramp, 0, 255).astype(np.uint8)


def hf(images, **kw):
    proc = Qwen2VLImageProcessorPil(
        min_pixels=kw.get("min_pixels", MIN_PIXELS), max_pixels=kw.get("max_pixels", MAX_PIXELS)
    )
    out = proc(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def check(images, **kw):
    want_pv, want_grid = hf(images, **kw)
    got_pv, got_grid = preprocess_images(images, **kw)
    assert got_pv.dtype == np.float32 and got_pv.shape == want_pv.shape
    np.testing.assert_array_equal(got_grid, want_grid)
    # Same PIL resampling and the same float ops in the same order: bit-identical.
    np.testing.assert_array_equal(got_pv, want_pv)
    return got_grid


def test_odd_sizes_pil_and_arrays_in_one_call():
    images = [
        Image.fromarray(noise(123, 77)),  # odd size, rounded to multiples of 28
        noise(61, 95),  # uint8 array
        Image.fromarray(noise(56, 84)),  # already a multiple of 28: resized to itself
    ]
    grid = check(images)
    assert grid.tolist() == [[1, 8, 6], [1, 4, 6], [1, 4, 6]]


def test_grayscale_and_rgba_become_rgb():
    rgba = noise(45, 70, 4)
    rgba[..., 3] = RNG.integers(0, 256, rgba.shape[:2])  # partial transparency -> onto white
    images = [
        Image.fromarray(noise(50, 66, 1)[..., 0], mode="L"),
        Image.fromarray(rgba, mode="RGBA"),
        Image.fromarray(noise(40, 90, 2), mode="LA"),
        noise(47, 52, 1),  # (H, W, 1) array
        rgba,  # (H, W, 4) array: HF's numpy compositing formula
    ]
    check(images)


def test_tiny_image_upscaled_to_min_pixels():
    grid = check([Image.fromarray(noise(9, 13))])
    assert grid.tolist() == [[1, 4, 6]]  # 9x13 -> 56x84, the first >= min_pixels (3136)


def test_large_image_capped_by_max_pixels():
    max_pixels = 140 * 140
    grid = check([Image.fromarray(noise(600, 452))], max_pixels=max_pixels)
    t, h, w = grid[0]
    assert h * w * 14 * 14 <= max_pixels and (h, w) == (10, 8)
    # The 7B default cap, on sizes alone (no 13-megapixel arrays in a unit test).
    for size in [(5000, 4000), (4099, 3071), (20000, 150), (3, 500)]:
        assert smart_resize(*size) == hf_smart_resize(
            *size, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
        )
    h, w = smart_resize(5000, 4000)
    assert h * w <= MAX_PIXELS and h % 28 == w % 28 == 0


def test_patch_layout_matches_the_vision_tower_order():
    # An image whose pixels encode their own (row, col): patch k of merge block (bi, bj) at
    # offset (mi, mj) must start at row 28*bi + 14*mi, col 28*bj + 14*mj, for both frames.
    rows = np.repeat(np.arange(56)[:, None], 84, 1)
    img = np.stack([rows, np.repeat(np.arange(84)[None], 56, 0), rows], -1).astype(np.uint8)
    pv, grid = preprocess_images([img], mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert grid.tolist() == [[1, 4, 6]]
    patches = np.rint(pv).reshape(24, 3, 2, 14, 14)
    np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])
    k = 0
    for bi in range(2):
        for bj in range(3):
            for mi in range(2):
                for mj in range(2):
                    assert patches[k, 0, 0, 0, 0] == 28 * bi + 14 * mi
                    assert patches[k, 1, 0, 0, 0] == 28 * bj + 14 * mj
                    k += 1


def test_bad_inputs_name_the_image():
    good = noise(30, 30)
    with pytest.raises(TypeError, match=r"images\[1\] has dtype float32.*uint8"):
        preprocess_images([good, good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"images\[1\] has shape \(30, 30, 2\)"):
        preprocess_images([good, good[..., :2]])
    with pytest.raises(TypeError, match=r"images\[0\] is a list"):
        preprocess_images([good.tolist()])
    with pytest.raises(ValueError, match=r"images\[2\].*aspect ratio"):
        preprocess_images([good, good, np.zeros((2, 500, 3), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([])
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        preprocess_images([good], min_pixels=10_000, max_pixels=100)
