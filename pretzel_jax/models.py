"""Model registry: config.model -> an nnx.Module with `loss(batch, key)`, plus its end-of-run
report. The only module that knows every model kind; train/ and sample/ stay generic."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
from flax import nnx

from pretzel_jax.flow import FlowConfig
from pretzel_jax.flow.image_flow import ImageFlow, ImageFlowConfig
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.vlm import TextConfig, VisionConfig, VLMConfig
from pretzel_jax.vlm.lm_loss import PackedLM
from pretzel_jax.vlm.tower_pretrain import TowerPretrain, TowerPretrainConfig, load_tower

KINDS = ("image_flow", "vlm", "fae", "tower_pretrain")


def _defaults(cls) -> dict:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def default_model_config() -> ml_collections.ConfigDict:
    """Every model knob with its single default (the dataclasses hold the values)."""
    image = _defaults(ImageFlowConfig) | dict(image_shape=(8, 8, 1), patch_size=2, num_levels=17)
    # token_dim 0 = derived (patch_size^2 * channels); () permutations = the STARFlow default.
    flow = _defaults(FlowConfig) | dict(token_dim=0, permutations=())
    return ml_collections.ConfigDict(
        {
            "kind": "image_flow",
            "image_flow": image,
            "flow": flow,
            "vlm": default_vlm_config(),
            "fae": _default_fae_config(),  # kind "fae": pretzel_jax.models_fae
            # kind "tower_pretrain": the model.vlm.vision tower with dense-label heads
            # (pretzel_jax.vlm.tower_pretrain), on `image_size` images of the shapes family.
            "tower_pretrain": _default_tower_pretrain_config(),
            # kind "vlm": start the vision tower from this tower.safetensors ("" = random); its
            # merger too unless `vision_init_merger` is False (the VLM merges differently).
            "vision_init": "",
            "vision_init_merger": True,
            # End-of-run report (ImageFlow): CFG sample grid and held-out bits/dim on the first
            # `bpd_examples` examples of `split` (0 = all of it).
            # (vlm): greedy VQA and captions on `vqa_records`/`caption_records` records of the
            # test and heldout splits; `export_hf` also writes the run dir's hf/ folder.
            "report": {
                "guidance": 1.0,
                "samples_per_class": 10,
                "dequant_draws": 4,
                "bpd_examples": 0,
                "split": "test",
                "vqa_records": 200,
                "caption_records": 200,
                "batch_size": 64,
                "max_answer_tokens": 8,
                "max_caption_tokens": 32,
                "export_hf": True,
            },
        }
    )


def _default_fae_config() -> ml_collections.ConfigDict:
    from pretzel_jax import models_fae  # imports vlm and the encoders: only when configs are made

    return models_fae.default_config()


def _default_tower_pretrain_config() -> dict:
    from pretzel_jax.data.shapes.scene import CELL_LABEL_CLASSES, ROWS

    return _defaults(TowerPretrainConfig) | dict(
        cell_grid=len(ROWS),
        cell_classes=CELL_LABEL_CLASSES,
        report_batches=8,  # eval batches per split in the end-of-run report
    )


def default_vlm_config() -> dict:
    """The toy Qwen2.5-VL of stage 0 (shapes word tokenizer ids; 32 px images -> 8x8 tokens)."""
    from pretzel_jax.data import tokenizer as tok

    text = _defaults(TextConfig) | dict(
        vocab_size=0,  # 0 = the shapes word tokenizer's size
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,  # 4 layers: the same VQA at 1.75x the step time (shapes_stage0_vlm.py)
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 6, 6),  # head_dim 32 / 2, Qwen's 2:3:3 split
        rope_theta=10_000.0,  # rows of <= 128 tokens: Qwen's 1e6 leaves the h/w sections ~flat
        tie_word_embeddings=True,
        unroll_layers=True,  # scanned steps take 1.12x as long (README benchmark 8)
    )
    vision = _defaults(VisionConfig) | dict(
        depth=4,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        # 4 px patches, no merge: a 32 px image is 8x8 patches = 8x8 tokens. (The 2-block tower
        # on 2 px patches with a 2x2 merge gives the same tokens at 0.23 vs 0.18 s/step with a
        # similar loss per step: 0.80 vs 0.82 at 800 steps.)
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=1,
        window_size=16,  # 4x4-patch windows
        fullatt_block_indexes=(1, 3),
        out_hidden_size=0,  # 0 = text hidden_size
        unroll_layers=True,
    )
    return dict(
        text=text,
        vision=vision,
        image_token_id=tok.IMAGE_PAD_ID,
        video_token_id=tok.VIDEO_PAD_ID,
        vision_start_token_id=tok.VISION_START_ID,
        vision_end_token_id=tok.VISION_END_ID,
        bos_token_id=-1,  # -1 = none
        eos_token_id=tok.IM_END_ID,
    )


def vlm_config(model_cfg: ml_collections.ConfigDict) -> VLMConfig:
    kw = model_cfg.vlm.to_dict()
    text = dict(kw.pop("text"))
    vision = dict(kw.pop("vision"))
    if not text["vocab_size"]:
        text["vocab_size"] = shapes_vocab_size()
    vision["out_hidden_size"] = vision["out_hidden_size"] or text["hidden_size"]
    if kw["bos_token_id"] < 0:
        kw["bos_token_id"] = None
    return _make(
        VLMConfig,
        dict(
            text=_make(TextConfig, text, "model.vlm.text"),
            vision=_make(VisionConfig, vision, "model.vlm.vision"),
            **kw,
        ),
        "model.vlm",
    )


def shapes_vocab_size() -> int:
    """Size of the shapes family's word tokenizer (fixed ids, then its words)."""
    from pretzel_jax.data import tokenizer as tok
    from pretzel_jax.data.shapes.tasks import WORDS

    fixed = [*tok.SPECIAL_TOKENS, *tok.ROLE_WORDS, *tok.PUNCTUATION]
    return len(fixed) + len(set(WORDS) - set(fixed))


def flow_config(model_cfg: ml_collections.ConfigDict, token_dim: int) -> FlowConfig:
    kw = model_cfg.flow.to_dict()
    kw["token_dim"] = kw["token_dim"] or token_dim
    kw["permutations"] = tuple(kw["permutations"]) or None
    return _make(FlowConfig, kw, "model.flow")


def image_flow_config(model_cfg: ml_collections.ConfigDict) -> ImageFlowConfig:
    kw = model_cfg.image_flow.to_dict()
    kw["image_shape"] = tuple(kw["image_shape"])
    h, w, c = kw["image_shape"]
    kw["flow"] = flow_config(model_cfg, kw["patch_size"] ** 2 * c)
    return _make(ImageFlowConfig, kw, "model.image_flow")


def _make(cls, kw: dict, where: str):
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{where}: {e}") from e


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    kind = config.model.kind
    if kind == "image_flow":
        return ImageFlow(image_flow_config(config.model), rngs=rngs)
    if kind == "vlm":
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
    if kind == "tower_pretrain":
        kw = config.model.tower_pretrain.to_dict()
        del kw["report_batches"]
        kw["vision"] = vlm_config(config.model).vision
        return TowerPretrain(_make(TowerPretrainConfig, kw, "model.tower_pretrain"), rngs=rngs)
    if kind == "fae":
        from pretzel_jax import models_fae

        return models_fae.build(config, rngs=rngs)
    raise ValueError(f"config.model.kind={kind!r} is unknown; use one of {KINDS}")


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


def report_fn(config: ml_collections.ConfigDict) -> Callable | None:
    """The end-of-run report for this model kind: fn(model, config, data, key, run_dir) -> dict."""
    if config.model.kind == "image_flow":
        from pretzel_jax.eval.image_flow_report import report

        if config.model.report.bpd_examples < 0:  # checked at start, not after the training
            raise ConfigError(
                f"model.report.bpd_examples={config.model.report.bpd_examples}: use 0 for the "
                "whole split or a positive count"
            )
        return report
    if config.model.kind == "vlm":
        from pretzel_jax.eval.vlm_report import report

        return report
    if config.model.kind == "fae":
        from pretzel_jax.eval.fae_report import report

        return report
    if config.model.kind == "tower_pretrain":
        from pretzel_jax.eval.tower_report import report

        return report
    return None
