"""QwenTokenizer renders Qwen2.5-VL's chat template and tokenizes exactly like transformers
(tokenizer.apply_chat_template and Qwen2_5_VLProcessor with images), on a small byte-level BPE
trained in-test with Qwen's pre-tokenizer and special tokens (tests/vlm/tiny_tokenizer.py)."""

import jinja2
import numpy as np
import pytest
import transformers
from PIL import Image

from pretzel_jax.vlm.tokenizer import QwenTokenizer
from tests.vlm.tiny_tokenizer import QWEN25VL_CHAT_TEMPLATE, ImageOnlyProcessor, write_tokenizer

MERGE = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def ours(folder):
    return QwenTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf_tok(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, what is the cat doing?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Describe  this\n\nimage."}]},
        {"role": "assistant", "content": "A cat on a mat."},
        {"role": "user", "content": "And the numbers 2024?", "name": None},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["string", "multi_turn"])
@pytest.mark.parametrize("gen", [True, False])
def test_text_chat_matches_transformers(ours, hf_tok, conv, gen):
    text = ours.apply_chat_template(conv, add_generation_prompt=gen)
    assert text == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    ids = ours.encode_chat(conv, add_generation_prompt=gen)
    ref = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    ref = ref["input_ids"] if isinstance(ref, dict | transformers.BatchEncoding) else ref
    assert ids == list(ref)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def _images():
    rng = np.random.default_rng(0)
    # Odd sizes: smart_resize gives different grids per image.
    return [
        Image.fromarray(rng.integers(0, 256, (61, 95, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (150, 47, 3), dtype=np.uint8)),
    ]


def test_image_chat_matches_processor(ours, hf_tok):
    images = _images()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0]},
                {"type": "text", "text": "Compare the left one"},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": "with the right one!"},
            ],
        }
    ]
    processor = ImageOnlyProcessor(
        image_processor=transformers.Qwen2VLImageProcessorPil(
            min_pixels=56 * 56, max_pixels=28 * 28 * 64, merge_size=MERGE
        ),
        tokenizer=hf_tok,
        video_processor=None,
        chat_template=QWEN25VL_CHAT_TEMPLATE,
    )
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert text == processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 2
    ref = processor(text=[text], images=images)
    grids = np.asarray(ref["image_grid_thw"])
    assert grids.tolist()[0] != grids.tolist()[1]
    ids = ours.encode_chat(messages, grids, merge_size=MERGE)
    assert ids == list(ref["input_ids"][0])
    assert ids.count(ours.token_id("<|image_pad|>")) == int(grids.prod(1).sum()) // MERGE**2
    # add_vision_id is a template variable: it reaches the template.
    assert "Picture 2: " in ours.apply_chat_template(messages, add_vision_id=True)


def test_errors(ours, folder, tmp_path):
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        ours.encode_chat(msg, [[1, 4, 4], [1, 4, 4]])
    with pytest.raises(ValueError, match="not in tokenizer.json"):
        ours.token_id("<|nope|>")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        QwenTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="no chat template"):
        QwenTokenizer.from_folder(tmp_path).apply_chat_template(msg)


def test_template_is_sandboxed(ours):
    evil = QwenTokenizer(ours.tokenizer, "{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    raising = QwenTokenizer(ours.tokenizer, "{{ raise_exception('bad role') }}", {})
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])
