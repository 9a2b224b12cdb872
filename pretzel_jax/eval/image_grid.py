"""Write image grids as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, path: str, *, scale: int = 1) -> None:
    """images uint8 (rows, cols, H, W, C) with C in {1, 3} -> one PNG, 1-pixel gaps."""
    rows, cols, h, w, c = images.shape
    gap = 1
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255, np.uint8)
    for r in range(rows):
        for k in range(cols):
            y, x = gap + r * (h + gap), gap + k * (w + gap)
            canvas[y : y + h, x : x + w] = images[r, k]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
