"""M-RoPE position ids for a mixed text/image token sequence (host side, numpy).

Equal to transformers' `Qwen2_5_VLModel.get_rope_index` (5.x) for images; videos are not
supported (pass video frames as images or extend this file). Per example, over the non-padding
tokens only:
- a text token gets `(p, p, p)` and advances the running position `p` by one;
- an image with grid `(t, h, w)` (patch units) occupies `t * h/m * w/m` tokens (m = spatial merge)
  in raster order, token `(i, j, k)` getting `(p + i, p + j, p + k)`; afterwards `p` advances by
  `max(h, w) // m` (not by t: HF's rule, kept for parity);
- padding slots get position 0 on all axes (HF 5.x initialises with zeros).
`deltas[b] = max(positions[b]) + 1 - n_real[b]` (HF's `mrope_position_deltas`).

Decoding convention (what HF `generate` does: it appends `last + 1` per axis): the k-th generated
token (k = 0, 1, ...) of example b gets `last[b] + 1 + k` on each axis, where `last[b]` is the
position of the last real prompt token (see `decode_positions`). For a prompt that ends in text
(every chat prompt) that is `n_real[b] + deltas[b] + k` on all three axes, i.e. with left padding
`s - n_pad[b] + deltas[b]` for absolute cache slot `s = L + k`.
"""

from __future__ import annotations

import numpy as np


def _image_runs(is_img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of consecutive image tokens."""
    edges = np.diff(np.concatenate([[0], is_img.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _image_positions(start: int, grid: np.ndarray, merge: int) -> np.ndarray:
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    ti, hi, wi = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([ti, hi, wi], axis=-1).reshape(-1, 3) + start


def _example_positions(
    ids: np.ndarray,
    grids: list[np.ndarray],
    merge: int,
    image_token_id: int,
    vision_start_token_id: int | None,
) -> np.ndarray:
    """Positions (n, 3) for one unpadded example; consumes its images from the front of `grids`."""
    starts, ends = _image_runs(ids == image_token_id)
    out = np.empty((ids.shape[0], 3), np.int64)
    pos = 0
    prev = 0
    for s, e in zip(starts, ends):
        if vision_start_token_id is not None and (s == 0 or ids[s - 1] != vision_start_token_id):
            raise ValueError(
                f"image tokens at index {s} do not follow a <vision_start> token "
                f"(id {vision_start_token_id}); wrap each image as <vision_start><image_pad>..."
                "<vision_end> (the tokenizer's chat template does this)"
            )
        out[prev:s] = (pos + np.arange(s - prev))[:, None]
        pos += s - prev
        # A run may hold several images back to back: split it by the grids' token counts.
        i = s
        while i < e:
            if not grids:
                raise ValueError(
                    "more image tokens in input_ids than images in image_grid_thw; give one "
                    "(t, h, w) row per image, in prompt order"
                )
            grid = grids.pop(0)
            n = int(np.prod(grid)) // merge**2
            if i + n > e:
                raise ValueError(
                    f"an image with grid_thw {tuple(int(g) for g in grid)} needs {n} image tokens "
                    f"but its run of image tokens has {e - i}; expand each placeholder to "
                    "t*h*w/merge**2 tokens (the tokenizer does this)"
                )
            out[i : i + n] = _image_positions(pos, grid, merge)
            pos += max(int(grid[1]), int(grid[2])) // merge
            i += n
        prev = e
    out[prev:] = (pos + np.arange(ids.shape[0] - prev))[:, None]
    return out


def rope_index(
    input_ids,
    image_grid_thw=None,
    attention_mask=None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids (B, L), image_grid_thw (n_images, 3) in prompt order over the whole batch,
    attention_mask (B, L) 1 = real token (left or right padding) ->
    (positions (B, L, 3) int32 [t, h, w], deltas (B,) int32).

    `vision_start_token_id`, when given, checks that every run of image tokens follows one.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    grids = [] if image_grid_thw is None else list(np.asarray(image_grid_thw).reshape(-1, 3))
    n_grids = len(grids)
    positions = np.zeros((*ids.shape, 3), np.int32)
    deltas = np.zeros(ids.shape[0], np.int32)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b]]
        if real.size == 0:
            continue
        pos = _example_positions(
            real, grids, spatial_merge_size, image_token_id, vision_start_token_id
        )
        positions[b][mask[b]] = pos
        deltas[b] = pos.max() + 1 - real.size
    if grids:
        raise ValueError(
            f"image_grid_thw has {n_grids} rows but input_ids hold only {n_grids - len(grids)} "
            "images; give one row per image placeholder"
        )
    return positions, deltas


def decode_positions(positions, attention_mask, step) -> np.ndarray:
    """Positions (B, 3) of the `step`-th generated token (0-based): last real prompt position + 1
    + step on each axis (HF generate's rule); works for left and right padding."""
    positions = np.asarray(positions)
    mask = (
        np.ones(positions.shape[:2], bool)
        if attention_mask is None
        else np.asarray(attention_mask) != 0
    )
    last = positions.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return (positions[np.arange(positions.shape[0]), last] + 1 + step).astype(np.int32)
