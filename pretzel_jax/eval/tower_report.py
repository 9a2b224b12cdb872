"""End-of-run report of a vision-tower pretraining (model kind "tower_pretrain"): the tower as
`tower.safetensors` in the run folder (the stage-0 VLM's `model.vision_init`), and the heads'
accuracies on the test and the held-out compositional split (report.json):
`cell_accuracy_<i>` per cell label (shapes: 0 shape or empty, 1 colour, 2 size; over the cells
that have the label), `token_cell_accuracy_<i>` (the same per token, with `token_cell_weight`)
and `position_accuracy` (each token's row and column)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pretzel_jax.vlm.tower_pretrain import TowerPretrain, save_tower, token_cells

log = logging.getLogger(__name__)
SPLITS = {"test": "", "heldout": "heldout_"}  # split -> report key prefix


def report(model: TowerPretrain, config, data, key, run_dir: str) -> dict[str, float]:
    del key
    run_dir = Path(run_dir)
    if jax.process_index() == 0:
        log.info("vision tower weights: %s", save_tower(model.tower, run_dir / "tower.safetensors"))
    metrics = nnx.jit(lambda m, b: m.loss(b, None)[1])
    tp = model.cfg
    owner = token_cells(tp.image_size, tp.token_grid, tp.cell_grid)
    out = {}
    for split, prefix in SPLITS.items():
        rows, weights = [], []
        for _, batch in zip(range(config.model.tower_pretrain.report_batches), data(split)):
            rows.append(jax.device_get(metrics(model, batch)))
            cells = np.asarray(batch["cells"])
            labelled = (cells >= 0).sum((0, 1))  # cells per label
            weights.append({f"cell_accuracy_{i}": n for i, n in enumerate(labelled)})
            if tp.token_cell_weight:
                labelled = (cells[:, owner] >= 0).sum((0, 1))  # tokens per label
                weights[-1] |= {f"token_cell_accuracy_{i}": n for i, n in enumerate(labelled)}
            weights[-1]["position_accuracy"] = len(batch["image"])  # same tokens per image
        for k in weights[0]:  # batch means, weighted back to means over cells / tokens
            out[prefix + k] = float(
                np.average([r[k] for r in rows], weights=[w[k] for w in weights])
            )
    if jax.process_index() == 0:
        (run_dir / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
