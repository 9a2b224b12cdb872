"""Seeded tiny random Hugging Face Qwen2 / Qwen2.5-VL models, built offline (torch CPU, fp32), and
what parity tests do with them: save to a folder and read back through the production converter
(`converted`: tests never carry their own HF -> pretzel_jax name map), reference logits from
transformers (`torch_logits`), left-padded batches and error measures.

HF initialises norm weights to 1 and biases to 0, and linear weights with std 0.02, which makes
many parity bugs invisible (a dropped norm or bias changes nothing). `randomize_` therefore
redraws every parameter: matrices with std 1/sqrt(fan_in), 1-D norm weights around 1 and biases
with std 0.1, all from one seeded generator.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pretzel_jax.convert import hf_qwen25vl  # noqa: E402
from pretzel_jax.vlm.model import Qwen25VL  # noqa: E402

VOCAB = 1000
# Special ids inside the tiny vocab; ids below 990 are ordinary text tokens.
BOS_TOKEN_ID = 990
EOS_TOKEN_ID = 991
VISION_START_TOKEN_ID = 992
VISION_END_TOKEN_ID = 993
IMAGE_TOKEN_ID = 994
VIDEO_TOKEN_ID = 995
PAD_TOKEN_ID = 996

TEXT_KW = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=PAD_TOKEN_ID,
)

VISION_KW = dict(
    depth=4,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1, 3],
    out_hidden_size=64,
)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter in place (tied tensors are drawn once: `parameters()` dedups)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(noise / fan_in**0.5)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:  # norm weights
            p.copy_(1.0 + 0.2 * noise)
    return model


def tiny_qwen2(tied: bool = True, seed: int = 0):
    """-> (Qwen2ForCausalLM in eval mode, fp32, its Qwen2Config)."""
    cfg = transformers.Qwen2Config(
        **TEXT_KW,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    return randomize_(model, seed), cfg


def qwen25vl_config(tied: bool = False) -> transformers.Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL config alone (no weights)."""
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            **TEXT_KW,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
            },
        ),
        vision_config=dict(VISION_KW),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )


def tiny_qwen25vl(seed: int = 0, tied: bool = False):
    """-> Qwen2_5_VLForConditionalGeneration in eval mode, fp32 (config at `model.config`)."""
    cfg = qwen25vl_config(tied)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    return randomize_(model, seed)


def save(model, directory) -> Path:
    """save_pretrained in safetensors (config.json + model.safetensors) -> the folder."""
    model.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def converted(hf, directory, dtype=jnp.float32) -> Qwen25VL:
    """`hf` saved to `directory` and loaded by `pretzel_jax.convert.hf_qwen25vl.load` (config via
    VLMConfig.from_hf, weights via the production name table)."""
    return hf_qwen25vl.load(save(hf, directory), dtype)


def torch_logits(hf, ids, pixel_values=None, grid=None, *, mask=None, pos=None) -> np.ndarray:
    """transformers' fp32 logits (numpy) for numpy/array inputs; None inputs are not passed."""
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    kw = dict(input_ids=t(ids), attention_mask=t(mask), position_ids=t(pos))
    if pixel_values is not None:
        kw.update(
            pixel_values=t(pixel_values),
            image_grid_thw=t(grid),
            # transformers 5 builds M-RoPE positions only when told which tokens are images.
            mm_token_type_ids=t((np.asarray(ids) == IMAGE_TOKEN_ID).astype(np.int32)),
        )
    with torch.no_grad():
        out = hf(**{k: v for k, v in kw.items() if v is not None})
    return out.logits.float().numpy()


def left_pad(rows) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of any lengths -> (ids (B, L) int64 padded on the left with PAD_TOKEN_ID,
    attention mask (B, L) int64, 1 on real tokens)."""
    total = max(map(len, rows))
    ids = np.full((len(rows), total), PAD_TOKEN_ID, np.int64)
    mask = np.zeros(ids.shape, np.int64)
    for b, row in enumerate(rows):
        ids[b, total - len(row) :] = row
        mask[b, total - len(row) :] = 1
    return ids, mask


def max_err(got, want, mask=None) -> float:
    """max |got - want| in float64; with a (B, L) `mask`, over the tokens where it is nonzero."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    if mask is None:
        return float(err.max())
    return float(err.max(-1)[np.asarray(mask) != 0].max())
