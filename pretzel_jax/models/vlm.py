"""Kind "vlm": the Qwen2.5-VL of `model.vlm` trained on packed rows (`PackedLM`), its vision
tower optionally started from a pretrained tower (`model.vision_init`); its report is
`pretzel_jax.eval.vlm_report`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from pretzel_jax.models.common import vlm_config
from pretzel_jax.models.registry import ModelKind, register
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.vlm import VisionConfig
from pretzel_jax.vlm.lm_loss import PackedLM
from pretzel_jax.vlm.tower_pretrain import load_tower


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> PackedLM:
    cfg = vlm_config(config.model)
    _check_vlm_data(cfg.vision, config.data)
    model = PackedLM(cfg, rngs=rngs)
    if config.model.vision_init:
        try:
            load_tower(
                model.vision,
                config.model.vision_init,
                merger=config.model.vision_init_merger,
            )
        except ValueError as e:
            raise ConfigError(f"model.vision_init: {e}") from e
    return model


def _check_vlm_data(vision: VisionConfig, data: ml_collections.ConfigDict) -> None:
    """The layout's tokens per image must be what the vision tower makes of the images."""
    if "latent_grid" not in data:
        return
    m = vision.spatial_merge_size
    want = tuple(g * vision.patch_size * m for g in data.latent_grid)
    if data.spatial_merge_size != m or tuple(data.image_size) != want:
        raise ValueError(
            f"config.data (image_size {tuple(data.image_size)}, latent_grid "
            f"{tuple(data.latent_grid)}, spatial_merge_size {data.spatial_merge_size}) does not "
            f"match model.vlm.vision (patch_size {vision.patch_size}, spatial_merge_size {m}): "
            f"set data.spatial_merge_size={m} and data.image_size={want}"
        )


def report(config: ml_collections.ConfigDict) -> Callable:
    from pretzel_jax.eval.vlm_report import report

    return report


# Its sizes are the shared section model.vlm (common.default_vlm_config), read by other kinds too.
register(ModelKind("vlm", None, build, report))
