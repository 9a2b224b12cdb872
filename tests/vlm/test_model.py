"""VLMConfig <-> HF config.json; Qwen25VL vs transformers' Qwen2_5_VLForConditionalGeneration."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pretzel_jax.convert import hf_qwen25vl
from pretzel_jax.vlm.config import VLMConfig
from pretzel_jax.vlm.image_processing import preprocess_images
from pretzel_jax.vlm.model import Qwen25VL
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
    hf_cfg = hf_tiny.qwen25vl_config(tied=tied)
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


# ---------------------------------------------------------------------------------------------
# Qwen25VL vs transformers (weights through our HF import, images through our preprocessing).

TOL = 1e-4
# bf16 parameters and compute vs transformers in fp32, two-image prompt: measured mean KL
# 1.85e-4 nats per token (jax 0.10.2 CPU); the bound leaves about 2x headroom.
KL_BOUND_BF16 = 4e-4
SIZES = {"a": (59, 85), "b": (101, 47)}  # odd (H, W) -> grids (1, 4, 6) and (1, 8, 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_tiny.tiny_qwen25vl(seed=0)
    path = tmp_path_factory.mktemp("qwen25vl")
    return hf, path, hf_tiny.converted(hf, path)


def images(*names):
    rng = np.random.default_rng(7)
    imgs = [rng.integers(0, 256, (*SIZES[n], 3), dtype=np.uint8) for n in names]
    return preprocess_images(imgs, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)


def prompt(rng, grids, text_lens):
    """text, <vision_start> image <vision_end>, text, ... (len(text_lens) = len(grids) + 1)."""
    ids = list(rng.integers(0, 990, text_lens[0]))
    for (t, h, w), n in zip(grids, text_lens[1:]):
        image = [hf_tiny.IMAGE_TOKEN_ID] * (t * h * w // 4)
        ids += [hf_tiny.VISION_START_TOKEN_ID, *image, hf_tiny.VISION_END_TOKEN_ID]
        ids += list(rng.integers(0, 990, n))
    return ids


def test_text_only_matches_transformers(tiny):
    hf, _, ours = tiny
    ids = np.random.default_rng(0).integers(0, 990, (2, 9))
    got = ours(ids)
    assert got.shape == (2, 9, hf_tiny.VOCAB) and got.dtype == jnp.float32
    assert hf_tiny.max_err(got, hf_tiny.torch_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("names", [("a",), ("a", "b")], ids=["one_image", "two_images"])
def test_images_match_transformers(tiny, names):
    hf, _, ours = tiny
    pixel_values, grid = images(*names)
    ids = np.array([prompt(np.random.default_rng(1), grid, [3] + [2] * len(names))])
    want = hf_tiny.torch_logits(hf, ids, pixel_values, grid)
    assert hf_tiny.max_err(ours(ids, pixel_values, grid), want) <= TOL
    # The images matter: zeroed pixels change the answer.
    assert hf_tiny.max_err(ours(ids, 0 * pixel_values, grid), want) > 1e-2


def test_padded_batch_matches_transformers(tiny):
    hf, _, ours = tiny
    pixel_values, grid = images("a", "b")
    rng = np.random.default_rng(2)
    ids, mask = hf_tiny.left_pad([prompt(rng, grid[:1], [2, 3]), prompt(rng, grid[1:], [5, 6])])
    got = ours(ids, pixel_values, grid, attention_mask=mask)
    want = hf_tiny.torch_logits(hf, ids, pixel_values, grid, mask=mask)
    assert hf_tiny.max_err(got, want, mask) <= TOL


def test_bf16_kl_to_fp32_transformers(tiny):
    hf, path, _ = tiny
    ours = hf_qwen25vl.load(path, dtype=jnp.bfloat16)
    pixel_values, grid = images("a", "b")
    ids = np.array([prompt(np.random.default_rng(3), grid, [4, 3, 5])])
    logp = jax.nn.log_softmax(jnp.asarray(hf_tiny.torch_logits(hf, ids, pixel_values, grid)), -1)
    logq = jax.nn.log_softmax(ours(ids, pixel_values, grid), -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1)))
    print(f"bf16 vs fp32 transformers: mean KL {kl:.2e} nats")
    assert KL_BOUND_BF16 > kl > 0


def test_image_token_count_must_match(tiny):
    _, _, ours = tiny
    pixel_values, grid = images("a")
    ids = np.array([prompt(np.random.default_rng(4), grid, [2, 2])])
    with pytest.raises(ValueError, match="6 image tokens .* 8 features"):
        ours(ids, *images("b"))
    with pytest.raises(ValueError, match="6 image tokens .* 0 features"):
        ours(ids)


def test_7b_parameter_count_equals_transformers():
    cfg = VLMConfig.from_hf(HUB_7B)
    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):
        hf = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(**copy.deepcopy(HUB_7B))
        )
    theirs = sum(p.numel() for p in hf.parameters())
    print(f"Qwen2.5-VL-7B parameters: pretzel_jax {ours:,}, transformers {theirs:,}")
    assert ours == theirs


def test_qwen2_folder_is_a_text_only_model(tmp_path):
    hf, _ = hf_tiny.tiny_qwen2(tied=True, seed=5)
    ours = hf_tiny.converted(hf, tmp_path)
    assert ours.vision is None and ours.text.lm_head is None
    ids, mask = hf_tiny.left_pad([list(range(10, 18)), list(range(30, 35))])
    want = hf_tiny.torch_logits(hf, ids, mask=mask)
    # transformers numbers pad slots too here; RoPE only sees position differences, so the
    # logits of real tokens agree with ours (positions counted over real tokens only).
    assert hf_tiny.max_err(ours(ids, attention_mask=mask), want, mask) <= TOL
    with pytest.raises(ValueError, match="no vision tower"):
        ours(ids, *images("a"))
