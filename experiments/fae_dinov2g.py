"""Paper-scale FAE (spec section 5): DINOv2-g/14 at 224 px -> 16x16 features (1536-d) -> one
attention layer + linear -> 16x16x32 latents -> 6-layer feature decoder -> ViT pixel decoder ->
256 px images.

    python -m pretzel_jax.train --config experiments/fae_dinov2g.py \
        --config.model.fae.encoder.path=/path/to/facebook/dinov2-giant \
        --config.data.name=... --config.data.data_dir=...
    python -m pretzel_jax.train --config experiments/fae_dinov2g.py:adapt \
        --config.model.fae.init_from=runs/fae_dinov2g/fae.safetensors ...

The DINOv2 weights come from a local Hugging Face folder (never downloaded here). Sizes the paper
does not give (decoder widths, pixel-decoder depth, loss weights, schedule) are our choices.
Verified by `jax.eval_shape` in tests/fae/test_fae.py (no weights, no data).
"""

from pretzel_jax.fae.model import FROZEN
from pretzel_jax.train.config import default_config

DINOV2_G = "checkpoints/dinov2-giant"  # a local HF folder of facebook/dinov2-giant


def get_config(arg: str | None = None):
    if arg not in (None, "adapt"):
        raise ValueError(f"unknown variant {arg!r}; use no argument or 'adapt'")
    c = default_config()
    c.data.batch_size = 256
    c.data.eval_batch_size = 256

    c.model.kind = "fae"
    f = c.model.fae
    f.phase = "pixel_adapt" if arg == "adapt" else "feature"
    f.image_size = 224  # 224 / 14 = 16x16 latent tokens
    f.feature_group = 1
    f.latent_channels = 32
    f.encoder_heads = 24  # 1536 / 24 = 64 per head
    f.decoder_depth = 6
    f.decoder_width = 0  # = 1536, the DINOv2-g width
    f.decoder_heads = 24
    f.pixel_depth = 12
    f.pixel_width = 1024
    f.pixel_heads = 16
    f.output_size = 256  # 16 px patches per token
    f.sigma_a = 0.3
    f.remat = "dots"
    f.compute_dtype = "bfloat16"
    f.encoder.kind = "dinov2"
    f.encoder.path = DINOV2_G
    f.encoder.if_missing = "error"
    f.init_from = "runs/fae_dinov2g/fae.safetensors" if arg == "adapt" else ""
    if arg == "adapt":  # its own folder: runs/fae_dinov2g holds the feature phase's checkpoints
        c.run_dir = "runs/fae_dinov2g_adapt"
    f.report.judge = False  # the shapes judge reads shapes images only
    f.report.images = 0

    c.optim.freeze = FROZEN[f.phase]
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0
    c.train.steps = 200_000 if arg is None else 50_000
    c.train.log_every = 100
    c.train.ckpt_every = 2000
    return c
