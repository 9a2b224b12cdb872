"""Pretraining the Qwen2.5-VL vision tower on dense image labels before the VLM trains (stage 0
at toy scale, where no pretrained tower exists).

Why: a tower learned from scratch only through the next-token loss learns to tell shapes apart
slowly, and the language model can hardly tell where an image token sits: the tower has no
absolute position embedding and attention values carry no position. Two heads on the tower's
output tokens teach both.
- Cell head: each of `cell_grid` x `cell_grid` image cells pools the tokens that cover it
  (weighted by overlap area) and classifies it once per label (e.g. the shape, colour and size
  of the object there); label -1 = none. With `token_cell_weight` > 0 the same head also
  classifies every token by the labels of the cell holding its centre: pooled labels alone leave
  a cell's shape in the mean of its tokens but in none of them, so the language model's attention
  could find an object by its colour (a per-token feature) but not by its shape ("what color is
  the circle?").
- Position head: each token classifies its own row and column in the token grid.
Only the tower goes on: the VLM starts from it with `model.vision_init` (`save_tower`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pretzel_jax.nn import Dense, param_file
from pretzel_jax.vlm.lm_loss import patchify
from pretzel_jax.vlm.vision import VisionConfig, VisionTower

TOWER_FORMAT = "pretzel_jax.vision_tower/1"
_WHAT = "vision tower weights"


@dataclasses.dataclass(frozen=True)
class TowerPretrainConfig:
    vision: VisionConfig
    image_size: int = 32
    cell_grid: int = 3
    cell_classes: tuple[int, ...] = (5, 6, 2)
    position_weight: float = 1.0
    token_cell_weight: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "cell_classes", tuple(self.cell_classes))
        side = self.vision.patch_size * self.vision.spatial_merge_size
        if self.image_size % side:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the tower's patch_size * "
                f"spatial_merge_size = {side}"
            )
        if self.cell_grid < 1 or not self.cell_classes or min(self.cell_classes) < 1:
            raise ValueError(
                f"cell_grid ({self.cell_grid}) and every entry of cell_classes "
                f"{self.cell_classes} must be >= 1"
            )

    @property
    def token_grid(self) -> int:
        return self.image_size // (self.vision.patch_size * self.vision.spatial_merge_size)


def cell_pooling(image_size: int, token_grid: int, cell_grid: int) -> np.ndarray:
    """(cell_grid**2, token_grid**2) weights: each cell's mean over the tokens covering it, each
    token weighted by the area it shares with the cell (cells and tokens in raster order)."""
    cells = np.linspace(0, image_size, cell_grid + 1)
    tokens = np.linspace(0, image_size, token_grid + 1)
    overlap = np.clip(
        np.minimum(cells[1:, None], tokens[None, 1:])
        - np.maximum(cells[:-1, None], tokens[None, :-1]),
        0,
        None,
    )  # (cell_grid, token_grid) along one axis
    w = np.einsum("ai,bj->abij", overlap, overlap).reshape(cell_grid**2, token_grid**2)
    return w / w.sum(1, keepdims=True)


class TowerPretrain(nnx.Module):
    """A VisionTower with a cell head and a position head; `loss(batch, key)` for the train loop
    over {"image": uint8 (B, H, W, 3), "cells": int (B, cell_grid**2, len(cell_classes))}."""

    def __init__(self, cfg: TowerPretrainConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tower = VisionTower(cfg.vision, rngs=rngs)
        d = cfg.vision.out_hidden_size
        self.cell_head = Dense(d, sum(cfg.cell_classes), axes=("embed", None), rngs=rngs)
        self.position_head = Dense(d, 2 * cfg.token_grid, axes=("embed", None), rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """uint8 (B, H, W, 3) -> cell logits (B, cells, sum(cell_classes)), position logits
        (B, tokens, 2 * token_grid): rows then columns, and the cell head on every token
        (B, tokens, sum(cell_classes))."""
        cfg, b = self.cfg, images.shape[0]
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]} but the tower pretraining "
                f"expects {cfg.image_size}x{cfg.image_size} (model.tower_pretrain.image_size)"
            )
        g = cfg.token_grid * cfg.vision.spatial_merge_size
        tokens = self.tower(patchify(images, cfg.vision), ((1, g, g),) * b).reshape(
            b, -1, cfg.vision.out_hidden_size
        )
        pool = jnp.asarray(cell_pooling(cfg.image_size, cfg.token_grid, cfg.cell_grid))
        cells = jnp.einsum("ct,btd->bcd", pool, tokens.astype(jnp.float32))
        return self.cell_head(cells), self.position_head(tokens), self.cell_head(tokens)

    def loss(self, batch: dict[str, jax.Array], key: jax.Array):
        del key  # deterministic
        cfg = self.cfg
        cell_logits, pos_logits, token_logits = self(batch["image"])
        labels = batch["cells"]
        metrics = {}
        total = _label_loss(cell_logits, labels, cfg.cell_classes, metrics, "cell_accuracy")
        if cfg.token_cell_weight:
            owner = jnp.asarray(token_cells(cfg.image_size, cfg.token_grid, cfg.cell_grid))
            total += cfg.token_cell_weight * _label_loss(
                token_logits, labels[:, owner], cfg.cell_classes, metrics, "token_cell_accuracy"
            )
        t = cfg.token_grid
        rows = jnp.broadcast_to(jnp.arange(t * t) // t, pos_logits.shape[:2])
        cols = jnp.broadcast_to(jnp.arange(t * t) % t, pos_logits.shape[:2])
        pos = (
            optax.softmax_cross_entropy_with_integer_labels(pos_logits[..., :t], rows).mean()
            + optax.softmax_cross_entropy_with_integer_labels(pos_logits[..., t:], cols).mean()
        )
        metrics["position_accuracy"] = (
            (pos_logits[..., :t].argmax(-1) == rows) & (pos_logits[..., t:].argmax(-1) == cols)
        ).mean()
        metrics["position_loss"] = pos
        loss = total + cfg.position_weight * pos
        return loss, metrics


def token_cells(image_size: int, token_grid: int, cell_grid: int) -> np.ndarray:
    """(token_grid**2,) the cell (raster index) holding each token's centre."""
    centres = (np.arange(token_grid) + 0.5) * image_size / token_grid
    axis = np.minimum((centres * cell_grid / image_size).astype(int), cell_grid - 1)
    return (axis[:, None] * cell_grid + axis[None, :]).reshape(-1)


def _label_loss(logits, labels, classes, metrics: dict, name: str) -> jax.Array:
    """Sum over label kinds of the mean cross entropy over valid (>= 0) labels; accuracies go
    into `metrics` as name_i."""
    total, start = 0.0, 0
    for i, n in enumerate(classes):
        y, part = labels[..., i], logits[..., start : start + n]
        valid = y >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(part, jnp.maximum(y, 0))
        count = jnp.maximum(valid.sum(), 1)
        total = total + jnp.where(valid, ce, 0.0).sum() / count
        metrics[f"{name}_{i}"] = ((part.argmax(-1) == y) & valid).sum() / count
        start += n
    return total


def save_tower(tower: VisionTower, path: str | Path) -> Path:
    """The tower's weights (and its VisionConfig) as one safetensors file."""
    return param_file.save(tower, path, TOWER_FORMAT)


def load_tower(tower: VisionTower, path: str | Path, *, merger: bool = True) -> None:
    """Sets `tower`'s weights from a `save_tower` file; one clear error if it is missing,
    corrupt or of other sizes. `merger=False` sets the patch embedding and blocks only and leaves
    the merger as it is (a VLM that merges more patches per token than the pretrained tower)."""
    hint = (
        "train it with experiments/shapes_stage0_tower.py (the run folder holds "
        "tower.safetensors) or set model.vision_init='' to start from random weights"
    )
    tensors = param_file.read(path, TOWER_FORMAT, _WHAT, hint)
    fix = "model.vlm.vision must be the sizes the tower was trained with"
    if merger:
        param_file.load_into(tower, tensors, path, _WHAT, fix)
        return
    for name in ("patch_embed", "blocks"):
        part = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
        param_file.load_into(getattr(tower, name), part, path, f"{_WHAT} ({name})", fix)
