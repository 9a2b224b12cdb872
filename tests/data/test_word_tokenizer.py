"""Word-level tokenizer: fixed special ids, round trip over the vocabulary, [UNK], Qwen folder."""

from __future__ import annotations

import json

import pytest

from pretzel_jax.data import tokenizer as wt
from pretzel_jax.vlm.tokenizer import QwenTokenizer

TEXTS = [
    "A red circle at the top left.",
    "Two blue squares, one small green triangle!",
    "Is there a yellow circle to the left of the square? Yes",
    "now the circle turns purple",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("word_tok")
    wt.build_word_tokenizer(wt.vocabulary(TEXTS), path)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return wt.load_word_tokenizer(folder)


def test_special_token_ids_are_fixed(tok):
    expected = {
        "<|endoftext|>": 0,
        "<|im_start|>": 1,
        "<|im_end|>": 2,
        "<|vision_start|>": 3,
        "<|vision_end|>": 4,
        "<|image_pad|>": 5,
        "<|video_pad|>": 6,
        "[UNK]": 7,
    }
    assert expected == wt.SPECIAL_IDS
    assert {t: tok.token_to_id(t) for t in expected} == expected
    assert [tok.token_to_id(w) for w in wt.ROLE_WORDS] == [8, 9, 10]
    for token, i in expected.items():  # matched whole inside raw text, never lowercased/split
        assert tok.encode(f"red{token}red").ids == [
            tok.token_to_id("red"),
            i,
            tok.token_to_id("red"),
        ]


def test_round_trip_over_vocabulary(tok):
    vocab = tok.get_vocab()
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in wt.SPECIAL_IDS]
    assert len(vocab) == len(set(vocab.values())) == max(vocab.values()) + 1  # dense ids
    ids = tok.encode(" ".join(words)).ids
    assert ids == list(range(len(wt.SPECIAL_IDS), len(vocab)))
    assert tok.decode(ids) == " ".join(words)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert wt.UNK_ID not in ids
        assert tok.decode(ids) == " ".join(wt.split_words(text))
        assert wt.split_words(text) == [w.lower() for w in wt.split_words(text)]


def test_unknown_word_is_unk_and_visible_in_decode(tok):
    ids = tok.encode("a magenta circle").ids
    assert ids == [tok.token_to_id("a"), wt.UNK_ID, tok.token_to_id("circle")]
    assert tok.decode(ids) == "a [UNK] circle"


def test_ids_depend_only_on_the_set_of_words(tmp_path):
    a = wt.build_word_tokenizer(["red", "circle", "a"], tmp_path / "a")
    b = wt.build_word_tokenizer(["circle", "a", "red", "red"], tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()


def test_bad_word_and_bad_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"'top left'.*\['top', 'left'\]"):
        wt.build_word_tokenizer(["top left"], tmp_path)
    with pytest.raises(ValueError, match=r"'Red'"):
        wt.build_word_tokenizer(["Red"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        wt.load_word_tokenizer(tmp_path / "nowhere")


def test_loads_as_qwen_tokenizer_with_chat_template(folder, tok):
    qwen = QwenTokenizer.from_folder(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert qwen.token_id("<|image_pad|>") == wt.IMAGE_PAD_ID
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]},
        {"role": "assistant", "content": "red"},
    ]
    text = qwen.apply_chat_template(messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is it red?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    ids = qwen.encode_chat(messages, [[1, 4, 6]], merge_size=2, add_generation_prompt=False)
    word = tok.token_to_id
    assert ids == [
        wt.IM_START_ID, word("user"), wt.VISION_START_ID, *[wt.IMAGE_PAD_ID] * 6,
        wt.VISION_END_ID, word("is"), wt.UNK_ID, word("red"), word("?"), wt.IM_END_ID,
        wt.IM_START_ID, word("assistant"), word("red"), wt.IM_END_ID,
    ]  # fmt: skip
    assert qwen.decode(ids) == "user is [UNK] red ? assistant red"
