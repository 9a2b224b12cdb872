"""The VLM stream: Qwen2.5-VL (text decoder, vision tower, M-RoPE index, image processing,
tokenizer with chat template, generation). Weights in and out: `pretzel_jax.convert.hf_qwen25vl`."""

from pretzel_jax.vlm.config import VLMConfig
from pretzel_jax.vlm.generate import GenerateOutput, generate
from pretzel_jax.vlm.image_processing import preprocess_images
from pretzel_jax.vlm.model import Qwen25VL
from pretzel_jax.vlm.rope_index import rope_index
from pretzel_jax.vlm.text import TextConfig, TextDecoder
from pretzel_jax.vlm.tokenizer import QwenTokenizer
from pretzel_jax.vlm.vision import VisionConfig, VisionTower

__all__ = [
    "GenerateOutput",
    "QwenTokenizer",
    "Qwen25VL",
    "TextConfig",
    "TextDecoder",
    "VLMConfig",
    "VisionConfig",
    "VisionTower",
    "generate",
    "preprocess_images",
    "rope_index",
]
