"""Class-conditional deep-shallow flow on scikit-learn's digits (8x8, 17 levels), CPU scale.

    python -m pretzel_jax.data.prepare --name digits --data_dir data_cache
    python -m pretzel_jax.train --config experiments/digits_flow.py

`--config experiments/digits_flow.py:test` is a seconds-long smoke size (tests use it).
At the end the run folder holds report.json (held-out bits/dim vs a per-pixel Gaussian) and
samples_cfg<w>.png (one row of CFG samples per class).
"""

from pretzel_jax.train.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.data.name = "digits"
    c.data.data_dir = "data_cache"
    c.data.batch_size = 128
    c.data.eval_batch_size = 360

    m = c.model
    m.kind = "image_flow"
    m.image_flow.image_shape = (8, 8, 1)
    m.image_flow.num_levels = 17
    m.image_flow.patch_size = 2  # 16 tokens of 4 pixels
    m.image_flow.num_classes = 10
    m.image_flow.label_dropout = 0.1
    m.image_flow.noise = "uniform"  # exact discrete bits/dim
    m.flow.width = 64
    m.flow.head_dim = 32
    m.flow.layers_per_block = (1, 1, 2)  # shallow, shallow, deep
    m.flow.context_dim = 64  # the class embedding is the deep block's one-token prefix
    m.report.guidance = 1.0
    m.report.samples_per_class = 10

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.min_lr = 1e-5
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0

    c.train.steps = 2000
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.ckpt_every = 500

    if arg == "test":
        c.data.batch_size = 16
        c.train.steps = 4
        c.train.log_every = 2
        c.train.eval_every = 0
        c.train.ckpt_every = 2
        c.optim.warmup_steps = 2
        c.model.report.samples_per_class = 2
        c.model.report.dequant_draws = 1
        c.model.report.bpd_examples = 40
    elif arg is not None:
        raise ValueError(f"unknown size {arg!r}; use no argument or 'test'")
    return c
