"""Qwen tokenizer and chat template from a local checkpoint folder, without transformers.

- `tokenizer.json` is loaded with the `tokenizers` library (the same Rust tokenizer transformers
  wraps), so encode/decode are those of the checkpoint.
- The chat template comes from `chat_template.jinja`, else `chat_template.json` (the processor's
  template, the one with image placeholders), else `tokenizer_config.json["chat_template"]`, and is
  rendered in a sandboxed jinja2 environment set up like transformers' `apply_chat_template`
  (trim_blocks, lstrip_blocks, loopcontrols, `tojson`, `raise_exception`, `strftime_now`, the
  special tokens as variables). Templates are untrusted code: never render them unsandboxed.
- Images: the template writes one `<|image_pad|>` per image; `expand_image_tokens` repeats it
  `t*h*w / merge**2` times from `image_grid_thw`, as Qwen2_5_VLProcessor does before tokenizing.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_TOKEN = "<|image_pad|>"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (no reach into Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template may not set attribute {name!r}")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value):
    """Rebuild template inputs from plain JSON types; anything else (PIL images, arrays) becomes an
    inert '<TypeName>' string, so the sandbox never sees methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    for base in (str, bool, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _token_text(value):
    """Special token entries in tokenizer_config.json are strings or AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download the file") from e


def _find_template(folder: Path, tok_cfg: dict) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


@dataclasses.dataclass
class QwenTokenizer:
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None = None
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_folder(cls, path) -> QwenTokenizer:
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}; point --ckpt at the downloaded checkpoint folder "
                "(it holds tokenizer.json, tokenizer_config.json, config.json, *.safetensors)"
            )
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        tok_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        special = {
            k: _token_text(v)
            for k, v in tok_cfg.items()
            if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v is not None
        }
        return cls(tok, _find_template(folder, tok_cfg), special)

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with tokenizer.json's post-processing (none for Qwen)."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(
                f"token {token!r} is not in tokenizer.json's vocabulary or added tokens"
            )
        return tid

    # -- chat ------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, **template_kwargs
    ) -> str:
        """Render one conversation as transformers' `apply_chat_template(tokenize=False)` does.
        Content parts: {"type": "text", "text": ...} and {"type": "image"} (any image payload)."""
        if self.chat_template is None:
            raise ValueError(
                "the checkpoint folder has no chat template (chat_template.jinja, "
                "chat_template.json or tokenizer_config.json['chat_template']); copy it from the "
                "model's hub page"
            )
        if not messages:
            raise ValueError("cannot render an empty conversation; give at least one message")
        # Like transformers: keys whose value is None are dropped before rendering.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return compile_template(self.chat_template).render(
            messages=_plain(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain({**self.special_tokens, **template_kwargs}),
        )

    def expand_image_tokens(self, text: str, image_grid_thw, merge_size: int) -> str:
        """Repeat the i-th `<|image_pad|>` t*h*w/merge**2 times (grid row i)."""
        grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(grids):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} image placeholders but {len(grids)} images were "
                "given; give one image per {'type': 'image'} content part"
            )
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out.append(IMAGE_TOKEN * (int(np.prod(grid)) // merge_size**2) + piece)
        return "".join(out)

    def encode_chat(
        self,
        messages: list[dict],
        image_grid_thw=None,
        *,
        merge_size: int = 2,
        add_generation_prompt: bool = True,
        **template_kwargs,
    ) -> list[int]:
        """Rendered, image-expanded and tokenized prompt (what the processor feeds the model)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        grids = np.zeros((0, 3)) if image_grid_thw is None else image_grid_thw
        return self.encode(self.expand_image_tokens(text, grids, merge_size))
