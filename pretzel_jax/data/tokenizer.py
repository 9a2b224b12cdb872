"""Word-level tokenizer for small synthetic vocabularies (the shapes family), saved as a Qwen-style
tokenizer folder so `pretzel_jax.vlm.tokenizer.QwenTokenizer.from_folder` and `VLMConfig` token
ids work unchanged.

Vocabulary (ids fixed, so a toy model config can hard-code them):

    0 <|endoftext|>   pad                      4 <|vision_end|>
    1 <|im_start|>    chat turn start          5 <|image_pad|>   image placeholder (one per latent)
    2 <|im_end|>      chat turn end; also eos  6 <|video_pad|>   unused, for parity with Qwen
    3 <|vision_start|>                         7 [UNK]           any word not in the vocabulary
    8..               the chat role words (system, user, assistant), punctuation, then the given
                      words, sorted (so the ids depend only on the set of words)

Text is NFKC-normalised and lowercased, then split on whitespace and punctuation (each
punctuation character is its own token); newlines are plain whitespace, so the chat template's
"\\n" after a role or `<|im_end|>` yields no token. Decoding joins tokens with single spaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, models, normalizers
from tokenizers import pre_tokenizers as pre

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
UNK = "[UNK]"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK)
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
PAD_ID, IM_START_ID, IM_END_ID = SPECIAL_IDS[PAD], SPECIAL_IDS[IM_START], SPECIAL_IDS[IM_END]
VISION_START_ID, VISION_END_ID = SPECIAL_IDS[VISION_START], SPECIAL_IDS[VISION_END]
IMAGE_PAD_ID, VIDEO_PAD_ID, UNK_ID = (
    SPECIAL_IDS[IMAGE_PAD],
    SPECIAL_IDS[VIDEO_PAD],
    SPECIAL_IDS[UNK],
)
ROLE_WORDS = ("system", "user", "assistant")
PUNCTUATION = tuple(".,?!:;'\"-()")

# Qwen2.5-VL's chat template minus the default system prompt (a toy vocabulary has no words for
# "You are a helpful assistant."); a system message is rendered only when given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer() -> pre.PreTokenizer:
    return pre.Sequence([pre.WhitespaceSplit(), pre.Punctuation(behavior="isolated")])


def split_words(text: str) -> list[str]:
    """The words `text` tokenizes into (normalised, split as the tokenizer splits)."""
    normalized = _normalizer().normalize_str(text)
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(normalized)]


def vocabulary(texts: Iterable[str]) -> list[str]:
    """Sorted distinct words of `texts`: pass the result to `build_word_tokenizer`."""
    return sorted({word for text in texts for word in split_words(text)})


def build_word_tokenizer(words: Iterable[str], path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Builds the tokenizer over `words` (see the module docstring) and saves it into folder
    `path` as `tokenizer.json` + `tokenizer_config.json` (created if needed). Returns it.

    Each word must be one token after normalisation and splitting (no spaces, not mixing
    punctuation with letters); a word that is not raises ValueError naming it.
    """
    fixed = list(SPECIAL_TOKENS) + list(ROLE_WORDS) + list(PUNCTUATION)
    given = set()
    for word in words:
        pieces = split_words(word)
        if pieces != [word]:
            raise ValueError(
                f"vocabulary word {word!r} is not a single normalised word (it tokenizes as "
                f"{pieces}); pass words through `vocabulary(texts)` first."
            )
        given.add(word)
    vocab = {token: i for i, token in enumerate(fixed)}
    for word in sorted(given - set(fixed)):
        vocab[word] = len(vocab)

    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    # Added tokens keep their ids and are matched in raw text before normalisation; the special
    # ones are skipped by decode(skip_special_tokens=True). [UNK] is not special, so a decoded
    # text still shows where an unknown word was.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t != UNK]
    )
    tok.add_tokens([AddedToken(UNK, special=False, normalized=False)])
    if any(tok.token_to_id(t) != i for t, i in SPECIAL_IDS.items()):
        raise AssertionError("special token ids moved; the vocabulary layout is broken")

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    flags = dict(special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): {"content": t, **flags, "special": t != UNK} for t, i in SPECIAL_IDS.items()
        },
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


def load_word_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Loads the tokenizer saved by `build_word_tokenizer` into folder `path`."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}; build the data set (it saves its tokenizer) or call "
            "`build_word_tokenizer(words, path)`."
        )
    tok = tokenizers.Tokenizer.from_file(str(file))
    wrong = {t: tok.token_to_id(t) for t, i in SPECIAL_IDS.items() if tok.token_to_id(t) != i}
    if wrong:
        raise ValueError(
            f"{file} is not a word tokenizer of this layout: special token ids {wrong}, expected "
            f"{SPECIAL_IDS}; rebuild it with `build_word_tokenizer`."
        )
    return tok
