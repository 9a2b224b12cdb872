"""Write image grids as PNG, and read their tiles back."""

from __future__ import annotations

import numpy as np
from PIL import Image

GAP = 1  # pixels between tiles (before scaling)


def save_grid(images: np.ndarray, path: str, *, scale: int = 1) -> None:
    """images uint8 (rows, cols, H, W, C) with C in {1, 3} -> one PNG, 1-pixel gaps."""
    rows, cols, h, w, c = images.shape
    gap = GAP
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255, np.uint8)
    for r in range(rows):
        for k in range(cols):
            y, x = gap + r * (h + gap), gap + k * (w + gap)
            canvas[y : y + h, x : x + w] = images[r, k]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def read_tiles(path, cols: int, n: int, *, scale: int = 1) -> list[np.ndarray]:
    """The first n square tiles, row by row, of a `save_grid` PNG of `cols` columns."""
    grid = np.asarray(Image.open(path).convert("RGB"))[::scale, ::scale]
    size = (grid.shape[1] - GAP) // cols - GAP
    tiles = []
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = GAP + r * (size + GAP), GAP + k * (size + GAP)
        tiles.append(grid[y : y + size, x : x + size])
    return tiles
