"""What several model kinds share: the config sections they all read (`model.flow`,
`model.vlm`, `model.vision_init*`, `model.report`) and the helpers that turn config sections into
the model dataclasses, naming the config key when a value is wrong."""

from __future__ import annotations

import dataclasses

import ml_collections

from pretzel_jax.flow import FlowConfig
from pretzel_jax.vlm import TextConfig, VisionConfig, VLMConfig


def defaults(cls) -> dict:
    """The fields of dataclass `cls` that have a default, with it."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def make(cls, kw: dict, where: str):
    """cls(**kw), with a bad value or key reported as `config.<where>: ...`."""
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{where}: {e}") from e


def shared_config() -> dict:
    """The sections of config.model that belong to no single kind."""
    # token_dim 0 = derived (patch_size^2 * channels); () permutations = the STARFlow default.
    flow = defaults(FlowConfig) | dict(token_dim=0, permutations=())
    return {
        "flow": flow,
        # The Qwen2.5-VL sizes: kind "vlm", the tower of kind "tower_pretrain", the toy
        # encoder of kind "fae".
        "vlm": default_vlm_config(),
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


def default_vlm_config() -> dict:
    """The toy Qwen2.5-VL of stage 0 (shapes word tokenizer ids; 32 px images -> 8x8 tokens);
    the A/Bs behind its sizes are in experiments/shapes_stage0_vlm.py's docstring."""
    from pretzel_jax.data import tokenizer as tok

    text = defaults(TextConfig) | dict(
        vocab_size=0,  # 0 = the shapes word tokenizer's size
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,  # 3 or 4: no better VQA, slower steps (shapes_stage0_vlm.py)
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 6, 6),  # head_dim 32 / 2, Qwen's 2:3:3 split
        rope_theta=10_000.0,  # rows of <= 128 tokens: Qwen's 1e6 leaves the h/w sections ~flat
        tie_word_embeddings=True,
        unroll_layers=True,  # faster steps than scanned ones at this depth (README, 8.)
    )
    vision = defaults(VisionConfig) | dict(
        depth=4,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        # 4 px patches, no merge: a 32 px image is 8x8 patches = 8x8 tokens (a 2-block tower on
        # 2 px patches merged 2x2 gives the same tokens at slower steps).
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
    """config.model.vlm as a VLMConfig (0 sizes derived, -1 ids = none)."""
    kw = model_cfg.vlm.to_dict()
    text = dict(kw.pop("text"))
    vision = dict(kw.pop("vision"))
    if not text["vocab_size"]:
        text["vocab_size"] = shapes_vocab_size()
    vision["out_hidden_size"] = vision["out_hidden_size"] or text["hidden_size"]
    if kw["bos_token_id"] < 0:
        kw["bos_token_id"] = None
    return make(
        VLMConfig,
        dict(
            text=make(TextConfig, text, "model.vlm.text"),
            vision=make(VisionConfig, vision, "model.vlm.vision"),
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
    """config.model.flow as a FlowConfig (token_dim 0 = `token_dim`)."""
    kw = model_cfg.flow.to_dict()
    kw["token_dim"] = kw["token_dim"] or token_dim
    kw["permutations"] = tuple(kw["permutations"]) or None
    return make(FlowConfig, kw, "model.flow")
