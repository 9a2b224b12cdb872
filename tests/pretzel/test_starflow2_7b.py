"""experiments/starflow2_7b.py by `nnx.eval_shape` (no arrays): the parameter count of every part
against the architecture, computed by hand, and against the paper spec's figures (Qwen2.5-VL-7B's
7.6B text decoder, DINOv2-g/14's 1.14B, "3.6B trainable"), and each stage's trainable/frozen split
against the curriculum's freeze rules. `pytest -s` prints the table (also in the experiment's
docstring)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from pretzel_jax import models
from pretzel_jax.models.pretzel import FROZEN_BY_STAGE
from pretzel_jax.train.config import load_config
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.train.optimizer import param_policy

EXPERIMENT = "experiments/starflow2_7b.py"
# Row name -> how a parameter path starts.
PARTS = {
    "VLM text decoder": ("vlm", "text"),
    "VLM vision tower": ("vlm", "vision"),
    "FAE encoder (DINOv2-g/14)": ("fae", "encoder"),
    "FAE rest (latent enc., decs.)": ("fae",),
    "deep block (24 layers)": ("deep",),
    "shallow blocks (2 x 4 layers)": ("shallow",),
    "adapter A": ("adapter",),
    "W_vlm": ("w_vlm",),
    "W_D": ("w_d",),
}
# Groups each stage trains (DESIGN.md section 3); everything else is frozen.
TRAINED = {
    1: {"deep", "shallow"},
    2: {"adapter"},
    3: {"deep", "shallow", "adapter", "w_vlm", "w_d"},
}


def _config(stage: int):
    return load_config(f"{EXPERIMENT}:stage{stage}", device_count=8, process_count=1)


@pytest.fixture(scope="module")
def configs():
    return {k: _config(k) for k in (1, 2, 3)}


@pytest.fixture(scope="module")
def model(configs):
    return nnx.eval_shape(lambda: models.build(configs[3], rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def nested(model):
    return nnx.state(model, nnx.Param).to_pure_dict()


@pytest.fixture(scope="module")
def params(nested):
    return flatten_dict(nested)


def _key(path: tuple) -> str:
    return "/".join(map(str, path))


def _part(path: tuple) -> str:
    for name, prefix in PARTS.items():
        if path[: len(prefix)] == prefix:
            return name
    raise AssertionError(f"parameter {path} belongs to no part of the table")


def _counts(params) -> dict[str, int]:
    out = dict.fromkeys(PARTS, 0)
    for path, v in params.items():
        out[_part(path)] += int(np.prod(v.shape))
    return out


# -- the architecture, counted by hand ---------------------------------------------------------


def qwen_text_params(vocab, d, inter, layers, heads, kv_heads, tied) -> int:
    hd = d // heads
    attn = (d * d + d) + 2 * (d * kv_heads * hd + kv_heads * hd) + d * d  # q, k, v biased; o not
    mlp = 3 * d * inter  # gate, up, down (SwiGLU, no biases)
    layer = attn + mlp + 2 * d  # two RMSNorm scales
    embeddings = vocab * d * (1 if tied else 2)  # token table + untied LM head
    return layers * layer + d + embeddings  # + the final norm


def qwen_vision_params(depth, d, inter, t, p, c, merge, out) -> int:
    patch = c * t * p * p * d  # the Conv3d patch embedding, no bias
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (3 * d * inter + 2 * inter + d)
    m = d * merge * merge
    merger = d + (m * m + m) + (m * out + out)  # ln_q, then Linear(m, m), GELU, Linear(m, out)
    return patch + depth * block + merger


def dinov2_params(d, layers, hidden, patch, grid, c=3) -> int:
    emb = (patch * patch * c * d + d) + d + d + (grid * grid + 1) * d  # patch, cls, mask, pos
    ffn = (d * 2 * hidden + 2 * hidden) + (hidden * d + d)  # SwiGLU weights_in, weights_out
    layer = 4 * d + 4 * (d * d + d) + 2 * d + ffn  # 2 LayerNorms, q k v o, 2 layer scales
    return emb + layers * layer + 2 * d  # + the final LayerNorm


def flow_layer_params(w, ratio=4) -> int:
    """One pre-LN layer: LayerNorms (scale, bias), biased q k v o, biased GELU MLP x4."""
    h = ratio * w
    return 2 * 2 * w + 4 * (w * w + w) + (w * h + h) + (h * w + w)


def flow_block_params(w, layers, token_dim, context_dim) -> int:
    extras = (token_dim * w + w) + token_dim + w + (w * 2 * token_dim + 2 * token_dim)
    ctx = context_dim * w + w if context_dim else 0  # proj_in, sos, final norm, proj_out; P_t
    return layers * flow_layer_params(w) + extras + ctx


# -- tests -------------------------------------------------------------------------------------


def test_parameter_counts_match_the_architecture_and_the_paper(configs, nested, params):
    counts = _counts(params)
    total = sum(counts.values())
    policies = {k: param_policy(nested, configs[k].optim) for k in configs}
    trainable = {
        k: sum(int(np.prod(v.shape)) for p, v in params.items() if _key(p) in pol.trainable)
        for k, pol in policies.items()
    }
    rows = [f"| {'part':<29} | {'parameters':>14} | stage 1 | stage 2 | stage 3 |"]
    rows.append(f"|{'-' * 31}|{'-' * 16}|---------|---------|---------|")
    for name, n in counts.items():
        group = PARTS[name][0]
        flags = ["trained" if group in TRAINED[k] else "frozen " for k in (1, 2, 3)]
        rows.append(f"| {name:<29} | {n:>14,} | " + " | ".join(flags) + " |")
    rows.append(
        f"| {'total / trainable':<29} | {total:>14,} | "
        + " | ".join(f"{trainable[k] / 1e9:.3f}B".ljust(7) for k in (1, 2, 3))
        + " |"
    )
    print("\n" + "\n".join(rows))
    print("trainable per stage: " + ", ".join(f"{k}: {trainable[k]:,}" for k in (1, 2, 3)))

    # Qwen2.5-VL-7B: text decoder 7.6B (6.53B in the layers + 2 x 0.545B embedding / LM head).
    text = qwen_text_params(152064, 3584, 18944, 28, 28, 4, tied=False)
    assert counts["VLM text decoder"] == text == 7_615_616_512
    assert abs(text / 7.6e9 - 1) < 0.02
    vision = qwen_vision_params(32, 1280, 3420, 2, 14, 3, 2, 3584)
    assert counts["VLM vision tower"] == vision
    assert abs((text + vision) / 8.29e9 - 1) < 0.01  # the published Qwen2.5-VL-7B total
    # DINOv2-g/14: 1.14B (tests/fae/test_encoders.py matches transformers' count exactly).
    dino = dinov2_params(1536, 40, 4096, 14, 37)
    assert counts["FAE encoder (DINOv2-g/14)"] == dino
    assert abs(dino / 1.14e9 - 1) < 0.01
    # The flow stream: 32 layers of ~113M at width 3072 -> "3.6B trainable" in stage 3.
    assert abs(flow_layer_params(3072) / 113e6 - 1) < 0.01
    assert counts["deep block (24 layers)"] == flow_block_params(3072, 24, 32, 3584)
    assert counts["shallow blocks (2 x 4 layers)"] == 2 * flow_block_params(3072, 4, 32, 0)
    d_vlm, w = 3584, 3072
    assert counts["adapter A"] == (32 * d_vlm + d_vlm) + (d_vlm * d_vlm + d_vlm)
    assert counts["W_vlm"] == d_vlm * w + w and counts["W_D"] == w * d_vlm + d_vlm
    flow = sum(counts[n] for n in PARTS if PARTS[n][0] in TRAINED[3])
    assert trainable[3] == flow
    assert abs(trainable[3] / 3.6e9 - 1) < 0.05


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_its_groups(configs, nested, params, stage):
    config = configs[stage]
    assert config.model.pretzel.stage == stage
    policy = param_policy(nested, config.optim)
    by_group: dict[str, set[bool]] = {}
    for path in params:
        by_group.setdefault(path[0], set()).add(_key(path) in policy.trainable)
    assert {g for g, flags in by_group.items() if True in flags} == TRAINED[stage]
    assert all(len(flags) == 1 for flags in by_group.values())  # whole groups only
    assert set(FROZEN_BY_STAGE[stage]) & TRAINED[stage] == set()
    assert not by_group["vlm"] - {False} and not by_group["fae"] - {False}


def test_dtypes_and_stage_files(configs, params):
    # The frozen VLM in bf16 (its norm scales stay fp32); the trainable flow stream in fp32.
    vlm = [v for p, v in params.items() if p[0] == "vlm"]
    bf16 = sum(int(np.prod(v.shape)) for v in vlm if v.dtype == jnp.bfloat16)
    assert bf16 / sum(int(np.prod(v.shape)) for v in vlm) > 0.9999
    assert all(v.dtype == jnp.float32 for p, v in params.items() if p[0] in TRAINED[3])
    assert configs[1].model.pretzel.init_from == ""
    for k in (2, 3):
        assert (
            configs[k].model.pretzel.init_from
            == f"runs/starflow2_7b_stage{k - 1}/pretzel.safetensors"
        )
    assert len({configs[k].run_dir for k in configs}) == 3
    assert load_config(EXPERIMENT, device_count=8, process_count=1).model.pretzel.stage == 3


def test_dinov2_encoder_config_comes_from_the_folder_when_there_is_one(tmp_path, params):
    # The build reads only config.json there (no weights): DINOv2-g/14 with 4 registers.
    folder = tmp_path / "dinov2-giant-reg"
    folder.mkdir()
    hf = {
        "model_type": "dinov2_with_registers",
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "mlp_ratio": 4,
        "use_swiglu_ffn": True,
        "patch_size": 14,
        "image_size": 518,
        "num_register_tokens": 4,
    }
    (folder / "config.json").write_text(json.dumps(hf))
    config = load_config(
        f"{EXPERIMENT}:stage1",
        overrides=[f"model.fae.encoder.path={folder}"],
        device_count=8,
        process_count=1,
    )
    model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))
    encoder = model.fae.encoder
    assert encoder.cfg.num_register_tokens == 4 and encoder.cfg.interpolate_antialias
    assert encoder.cfg.compute_dtype == config.model.fae.compute_dtype  # the FAE section's
    theirs = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
    ours = sum(int(np.prod(v.shape)) for p, v in params.items() if p[:2] == ("fae", "encoder"))
    assert theirs == ours + 4 * 1536  # the register tokens

    (folder / "config.json").write_text(json.dumps(hf | {"model_type": "vit"}))
    with pytest.raises(ConfigError, match=r"model.fae.encoder.path=.*not a DINOv2 config"):
        models.build(config, rngs=nnx.Rngs(0))


def test_images_become_256_latent_tokens(model):
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    x = jax.eval_shape(lambda s, i: nnx.merge(graphdef, s).encode(i), state, images)
    assert x.shape == (2, 256, 32) and x.dtype == jnp.float32
