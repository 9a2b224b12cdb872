"""Images -> (pixel_values, image_grid_thw) exactly as Qwen2.5-VL's image processor makes them.

Steps per image (those of transformers' PIL-backend `Qwen2VLImageProcessorPil`, so outputs are
bit-identical): convert to RGB (transparency composited onto white), resize with PIL bicubic to
the `smart_resize` size (both sides multiples of patch_size * merge_size, area within
[min_pixels, max_pixels], aspect ratio kept), scale by 1/255, normalise with the CLIP mean/std,
repeat the frame `temporal_patch_size` times, and cut into patches flattened as (C, T, P, P) in
the vision tower's order: merge blocks in raster order, the m x m patches of a block consecutive.
Host-side numpy; no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Qwen2.5-VL's preprocessor_config.json.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 12845056
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_SIZE * MERGE_SIZE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, rescaled (aspect kept) into
    [min_pixels, max_pixels]. Same arithmetic as Qwen's processor, so the same sizes."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height}x{width} has aspect ratio "
            f"{max(height, width) / min(height, width):.1f}; Qwen2.5-VL accepts at most "
            f"{MAX_ASPECT_RATIO}: crop or pad it"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image, index: int = 0) -> np.ndarray:
    """PIL image or uint8 array (H, W), (H, W, 1|3|4) -> uint8 (H, W, 3). Transparency is
    composited onto white, as HF does (PIL's alpha_composite for images, its rounding formula for
    arrays)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"images[{index}] is a {type(image).__name__}; pass a PIL.Image or a uint8 numpy "
            "array of shape (H, W, 3)"
        )
    if image.dtype != np.uint8:
        raise TypeError(
            f"images[{index}] has dtype {image.dtype}; pass uint8 pixels in [0, 255] (e.g. "
            "np.round(x * 255).astype(np.uint8) for floats in [0, 1])"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images[{index}] has shape {image.shape}; expected (H, W, 3) channels-last (or "
            "(H, W), (H, W, 1) grayscale, (H, W, 4) RGBA)"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def patchify(
    image: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int
) -> np.ndarray:
    """(H, W, C) float -> (H/P * W/P, C*T*P*P); rows in (block row, block col, mh, mw) order."""
    h, w, c = image.shape
    p, m = patch_size, merge_size
    x = image.reshape(h // (p * m), m, p, w // (p * m), m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return x.reshape((h // p) * (w // p), c * temporal_patch_size * p * p)


def preprocess_images(
    images,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """images: a list of PIL images / uint8 (H, W, 3) arrays (a single one is accepted too) ->
    (pixel_values float32 (N, 3*T*P*P), image_grid_thw int64 (n, 3) rows (1, H/P, W/P))."""
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("preprocess_images got no images")
    if min(patch_size, temporal_patch_size, merge_size) < 1 or not 0 < min_pixels <= max_pixels:
        raise ValueError(
            "preprocess_images needs positive patch_size, temporal_patch_size, merge_size and "
            f"0 < min_pixels <= max_pixels (got {min_pixels}, {max_pixels})"
        )
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
    factor = patch_size * merge_size
    patches, grids = [], []
    for i, image in enumerate(images):
        rgb = to_rgb(image, i)
        height, width = rgb.shape[:2]
        if min(height, width) < 1:
            raise ValueError(f"images[{i}] is empty ({height}x{width})")
        try:
            h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
        except ValueError as e:
            raise ValueError(f"images[{i}]: {e}") from None
        rgb = np.array(Image.fromarray(rgb).resize((w, h), resample=Image.Resampling.BICUBIC))
        # Rescale in float64 then cast, normalise in float32: HF's order, so equal bits.
        x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - mean32) / std32
        patches.append(patchify(x, patch_size, temporal_patch_size, merge_size))
        grids.append((1, h // patch_size, w // patch_size))
    return np.concatenate(patches).astype(np.float32), np.asarray(grids, np.int64)
