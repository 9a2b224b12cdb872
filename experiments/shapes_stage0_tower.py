"""Stage 0 at toy scale, step 1 of 2: pretrain the VLM's vision tower (the sizes of
`model.vlm.vision`, unmerged) on dense labels of shapes images (`pretzel_jax.vlm.tower_pretrain`):
per 3x3 grid cell the shape (or empty), colour and size of its object, learned both from the cell's
pooled tokens and by every token of the cell (`token_cell_weight`), and per token its own row and
column. The tower learned only through the next-token loss sees shapes poorly and tells the LM
nothing of where a token is; with this step the stage-0 VLM's VQA accuracy after 5000 steps goes
from 60.8% (random tower) to 71.8% with pooled cell labels alone and 76.3% with per-token ones too
(the records' questions, tower trained on; with fresh questions and its blocks frozen, 85.8% after
5000 steps, 90.5% after 1500 with branched questions on 2x2-merged tokens: see that file). Measured
2026-12-04 (report.json, 1000 steps; 5 min 5 s for the whole command alone on the 2-core CPU on
2026-12-05, median 0.28 s/step; the same weights to the bit as the scanned layers' run): test cells
99.9% shape, 100% colour, 100% size; tokens 99.8%, 99.97%, 100% and 100% row and column; held-out
compositional split cells 92.0%, 98.4%, 99.1%, tokens 91.7%, 96.7%, 99.0%, 99.9%. With pooled cell
labels alone (`--config.model.tower_pretrain.token_cell_weight=0`; 6.7 min alone): cells 99.9%,
100%, 100%, tokens 100% row and column; held-out 90.6%, 96.5%, 100%, 99.99%.
On a 2-core Intel Xeon host (AVX-512) the default took 2 min 14 s (median 0.119 s/step; test cells
99.9%, 100%, 100%, tokens 99.8%, 99.97%, 99.99%, held-out cells 91.8%, 98.4%, 99.3%).
500 steps instead of 1000 (token shapes 96.4%) left the 4-layer VLM at 85.3% VQA instead of 89.5%.
At lr 2e-3 / 3e-3, 500 steps reach 98.8% / 98.0% token shapes; under 1000 VLM steps the first
scored 83.2% (see that file).

    python -m pretzel_jax.data.prepare --name shapes_cells --data_dir data_cache
    python -m pretzel_jax.train --config experiments/shapes_stage0_tower.py \\
        --run_dir runs/shapes_stage0_tower

`:test` is a seconds-long smoke size over `shapes_cells_tiny` (tests use it), with the tower sizes
of the stage-0 VLM's `:test`.
"""

from pathlib import Path

from pretzel_jax.train.config import default_config, load_config

VLM = Path(__file__).with_name("shapes_stage0_vlm.py")


def get_config(arg: str | None = None):
    c = default_config()
    c.model.kind = "tower_pretrain"
    c.model.vlm = load_config(f"{VLM}:{arg}" if arg else VLM).model.vlm  # the VLM's tower sizes
    # Labels per 4 px patch token, no merge: the VLM takes the blocks and merges with its own.
    c.model.vlm.vision.spatial_merge_size = 1
    c.data.name = "shapes_cells"
    c.data.data_dir = "data_cache"
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.data.eval_split = "validation"

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.min_lr = 1e-5
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    # Each token also learns its cell's labels, so that attention can find an object by shape.
    c.model.tower_pretrain.token_cell_weight = 1.0

    c.train.steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.ckpt_every = 500

    if arg == "test":
        c.data.name = "shapes_cells_tiny"
        c.data.batch_size = 8  # tests run on 8 fake devices
        c.data.eval_batch_size = 8
        c.model.tower_pretrain.report_batches = 1
        c.train.steps = 4
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.optim.warmup_steps = 2
    elif arg is not None:
        raise ValueError(f"unknown size {arg!r}; use no argument or 'test'")
    return c
