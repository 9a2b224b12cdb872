"""A small Qwen-style tokenizer folder built offline: byte-level BPE trained on a few sentences
with Qwen2's pre-tokenizer (NFC, the Qwen2 split regex, byte level), Qwen's special tokens at the
ids the tiny models of `hf_tiny` use, and Qwen2.5-VL's real chat template."""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers
from tokenizers import pre_tokenizers as pre

from tests.vlm import hf_tiny

# Qwen2.5-VL-7B-Instruct's chat_template.json (public).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Special tokens at the ids of hf_tiny's configs (bos 990, eos 991, vision 992..995, pad 996).
SPECIAL = {
    "<|im_start|>": hf_tiny.BOS_TOKEN_ID,
    "<|im_end|>": hf_tiny.EOS_TOKEN_ID,
    "<|vision_start|>": hf_tiny.VISION_START_TOKEN_ID,
    "<|vision_end|>": hf_tiny.VISION_END_TOKEN_ID,
    "<|image_pad|>": hf_tiny.IMAGE_TOKEN_ID,
    "<|video_pad|>": hf_tiny.VIDEO_TOKEN_ID,
    "<|endoftext|>": hf_tiny.PAD_TOKEN_ID,
    "<|vision_pad|>": hf_tiny.PAD_TOKEN_ID + 1,
}
CORPUS = [
    "You are a helpful assistant.",
    "Describe this image in detail, please.",
    "What is the cat doing? The cat sits on a red mat.",
    "Two images: compare the left one with the right one!",
    "Numbers 12345 and symbols #@! and üñíçødé text.",
] * 4


def write_tokenizer(path: Path) -> Path:
    """tokenizer.json, tokenizer_config.json and chat_template.json into `path`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    first = min(SPECIAL.values())
    filler = [f"<|reserved_{i}|>" for i in range(first - tok.get_vocab_size())]
    names = filler + sorted(SPECIAL, key=SPECIAL.get)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    assert all(tok.token_to_id(t) == i for t, i in SPECIAL.items())
    tok.save(str(path / "tokenizer.json"))
    flags = dict(special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, **flags} for t in names},
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 32768,
        "chat_template": QWEN25VL_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}))
    return path


class ImageOnlyProcessor(transformers.Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor (that one needs torchvision, absent here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)
