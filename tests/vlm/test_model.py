"""VLMConfig <-> HF config.json; Qwen25VL vs transformers' Qwen2_5_VLForConditionalGeneration."""

import copy

import pytest
import transformers

from pretzel_jax.vlm.config import VLMConfig
from tests.vlm import hf_tiny

# Qwen/Qwen2.5-VL-7B-Instruct config.json as published on the hub (flat text fields, rope in
# `rope_scaling`, vision `in_chans`); sizes as in paper_spec 6.2.
HUB_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_7b_hub_config_reads_as_the_defaults():
    cfg = VLMConfig.from_hf(HUB_7B)
    t, v = cfg.text, cfg.vision
    assert (t.vocab_size, t.hidden_size, t.intermediate_size) == (152064, 3584, 18944)
    assert (t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (28, 28, 4, 128)
    assert (t.rope_theta, t.mrope_section, t.tie_word_embeddings) == (1e6, (16, 24, 24), False)
    # Our dataclass defaults are the 7B's.
    assert v == type(v)() and cfg == VLMConfig(text=t, vision=type(v)())
    # transformers 5 reads the same file the same way; our export round-trips through it.
    via_hf = transformers.Qwen2_5_VLConfig(**copy.deepcopy(HUB_7B)).to_dict()
    assert VLMConfig.from_hf(via_hf) == cfg
    assert VLMConfig.from_hf(transformers.Qwen2_5_VLConfig(**cfg.to_hf()).to_dict()) == cfg


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_configs_round_trip(tied):
    hf_cfg = hf_tiny.tiny_qwen25vl(tied=tied).config
    cfg = VLMConfig.from_hf(hf_cfg.to_dict(), param_dtype="bfloat16", compute_dtype="bfloat16")
    assert cfg.text.tie_word_embeddings == tied and cfg.text.mrope_section == (2, 3, 3)
    assert cfg.vision.fullatt_block_indexes == (1, 3) and cfg.vision.param_dtype == "bfloat16"
    assert cfg.image_token_id == hf_tiny.IMAGE_TOKEN_ID and cfg.eos_token_id == hf_tiny.EOS_TOKEN_ID
    again = transformers.Qwen2_5_VLConfig(**cfg.to_hf()).to_dict()
    assert VLMConfig.from_hf(again, param_dtype="bfloat16", compute_dtype="bfloat16") == cfg

    _, q_cfg = hf_tiny.tiny_qwen2(tied=tied)
    cfg = VLMConfig.from_hf(q_cfg.to_dict())
    assert (
        cfg.vision is None
        and cfg.text.rope_theta == 10000.0
        and cfg.text.tie_word_embeddings == tied
    )
    assert cfg.to_hf()["model_type"] == "qwen2"
    assert VLMConfig.from_hf(transformers.Qwen2Config(**cfg.to_hf()).to_dict()) == cfg


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda d: d["rope_scaling"].update(type="yarn", factor=4.0),
            r"rope_parameters\['factor'\]",
        ),
        (lambda d: d["rope_scaling"].update(type="dynamic"), "rope_type='dynamic'"),
        (lambda d: d.update(use_sliding_window=True), "use_sliding_window"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda d: d["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
        (lambda d: d.update(head_dim=64), "head_dim=64"),
        (lambda d: d.update(my_new_knob=1), "my_new_knob"),
        (lambda d: d["vision_config"].update(deepstack_visual_indexes=[1]), "deepstack"),
        (lambda d: d.update(model_type="qwen2_vl"), "model_type 'qwen2_vl'"),
        (lambda d: d["vision_config"].update(out_hidden_size=2048), "out_hidden_size"),
    ],
)
def test_unsupported_fields_are_named(edit, match):
    d = copy.deepcopy(HUB_7B)
    edit(d)
    with pytest.raises(ValueError, match=match):
        VLMConfig.from_hf(d)


def test_non_strict_ignores_unknown_fields():
    d = dict(copy.deepcopy(HUB_7B), my_new_knob=1)
    assert VLMConfig.from_hf(d, strict=False) == VLMConfig.from_hf(HUB_7B)
