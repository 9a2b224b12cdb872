"""VLMConfig: text decoder + (optional) vision tower + special token ids, read from and written to
Hugging Face `config.json` dicts.

Layouts read by `from_hf`:
- `model_type` "qwen2" (Qwen2ForCausalLM): text only, 1-D RoPE (`vision` is None);
- `model_type` "qwen2_5_vl": either the hub layout (text fields at the top level, `rope_scaling`
  {"type": "mrope", "mrope_section": ...}, vision `in_chans` / `spatial_patch_size`), or the
  transformers >= 4.53 / 5 layout (nested `text_config`, rope in `rope_parameters`).
Fields that would change the model in ways we do not implement (other RoPE types, sliding window,
activations other than SiLU, an explicit head_dim that differs) raise ValueError naming them;
fields we do not know raise too (pass strict=False to ignore those).
`to_hf` writes the transformers 5 layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pretzel_jax.vlm.text import TextConfig
from pretzel_jax.vlm.vision import VisionConfig


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Generic PretrainedConfig keys (transformers 4.x and 5.x) and generation defaults that older
# versions saved into config.json; none of them changes the forward pass.
_GENERIC = _names(
    """_name_or_path architectures dtype torch_dtype transformers_version model_type id2label
    label2id is_encoder_decoder output_attentions output_hidden_states return_dict
    use_return_dict chunk_size_feed_forward problem_type tokenizer_class prefix
    task_specific_params finetuning_task tie_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size pruned_heads torchscript use_bfloat16 tf_legacy_loss
    _attn_implementation _attn_implementation_autoset _commit_hash attn_implementation
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens sep_token_id
    decoder_start_token_id pad_token_id initializer_range use_cache"""
)
# Text fields that only matter for training, caching or features we check elsewhere.
_TEXT_IGNORED = _names(
    """attention_dropout max_position_embeddings sliding_window max_window_layers
    vision_token_id image_token_id video_token_id vision_start_token_id vision_end_token_id
    text_config vision_config"""
)
_TEXT_USED = _names(
    """vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads rms_norm_eps rope_theta rope_scaling rope_parameters tie_word_embeddings
    hidden_act use_sliding_window bos_token_id eos_token_id head_dim layer_types"""
)
# `tokens_per_second` only scales video temporal positions (we take images only).
_VISION_USED = _names(
    """depth hidden_size intermediate_size num_heads in_channels in_chans patch_size
    spatial_patch_size temporal_patch_size spatial_merge_size window_size fullatt_block_indexes
    out_hidden_size hidden_act rope_parameters tokens_per_second"""
)
_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "mrope_section"})
_VISION_ROPE_THETA = 10000.0
_VISION_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# transformers' defaults when a config names no theta.
_DEFAULT_THETA = {"qwen2": 10000.0, "qwen2_5_vl": 1000000.0}


def _fail(field: str, value: Any, fix: str):
    raise ValueError(f"unsupported config field {field}={value!r}: {fix}")


def _check_known(d: Mapping, known: frozenset, where: str, strict: bool):
    if not strict:
        return
    unknown = sorted(k for k in d if k not in known and k not in _GENERIC)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {unknown} in {where}: pretzel_jax does not know whether "
            "they change the model; remove them from config.json if they do not, or call "
            "VLMConfig.from_hf(..., strict=False) to ignore them"
        )


def _rope(text: Mapping, model_type: str) -> tuple[float, tuple[int, ...] | None]:
    """-> (theta, mrope_section or None) from rope_parameters / rope_scaling / rope_theta."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    bad = sorted(set(rope) - _ROPE_KEYS)
    if bad:
        _fail(
            f"rope_parameters{bad}", {k: rope[k] for k in bad}, "only plain (M-)RoPE is implemented"
        )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        _fail("rope_parameters.rope_type", kind, "only 'default' / 'mrope' RoPE is implemented")
    default = _DEFAULT_THETA[model_type]
    theta = float(rope.get("rope_theta", text.get("rope_theta", default)))
    section = rope.get("mrope_section")
    return theta, None if section is None else tuple(int(s) for s in section)


def _text_config(text: Mapping, model_type: str, tied: bool, **dtypes) -> TextConfig:
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if key not in text:
            raise ValueError(f"config.json has no {key!r} (needed for the text decoder)")
    if text.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", text["hidden_act"], "only 'silu' (SwiGLU) is implemented")
    if text.get("use_sliding_window", False):
        _fail(
            "use_sliding_window",
            True,
            "sliding-window attention is not implemented; set it to false",
        )
    layer_types = text.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        _fail("layer_types", layer_types, "only 'full_attention' layers are implemented")
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    if text.get("head_dim") not in (None, hidden // heads):
        _fail(
            "head_dim",
            text["head_dim"],
            f"head_dim must be hidden_size / num_attention_heads = {hidden // heads}",
        )
    theta, section = _rope(text, model_type)
    if model_type == "qwen2":
        # 1-D RoPE = M-RoPE with equal positions on every axis; give all pairs to axis 0.
        section = (hidden // heads // 2, 0, 0)
    return TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=section or (16, 24, 24),
        tie_word_embeddings=tied,
        **dtypes,
    )


def _vision_config(v: Mapping, strict: bool, param_dtype: str, compute_dtype: str) -> VisionConfig:
    _check_known(v, _VISION_USED, "vision_config", strict)
    if v.get("hidden_act", "silu") != "silu":
        _fail("vision_config.hidden_act", v["hidden_act"], "only 'silu' is implemented")
    rope = v.get("rope_parameters") or {}
    if float(rope.get("rope_theta", _VISION_ROPE_THETA)) != _VISION_ROPE_THETA:
        _fail(
            "vision_config.rope_parameters.rope_theta",
            rope["rope_theta"],
            "the vision tower uses 10000",
        )
    patch = v.get("patch_size", v.get("spatial_patch_size", 14))
    if v.get("spatial_patch_size", patch) != patch:
        _fail(
            "vision_config.spatial_patch_size",
            v["spatial_patch_size"],
            f"must equal patch_size ({patch})",
        )
    d = VisionConfig()
    return VisionConfig(
        depth=int(v.get("depth", d.depth)),
        hidden_size=int(v.get("hidden_size", d.hidden_size)),
        intermediate_size=int(v.get("intermediate_size", d.intermediate_size)),
        num_heads=int(v.get("num_heads", d.num_heads)),
        in_channels=int(v.get("in_channels", v.get("in_chans", d.in_channels))),
        patch_size=int(patch),
        temporal_patch_size=int(v.get("temporal_patch_size", d.temporal_patch_size)),
        spatial_merge_size=int(v.get("spatial_merge_size", d.spatial_merge_size)),
        window_size=int(v.get("window_size", d.window_size)),
        fullatt_block_indexes=tuple(
            int(i) for i in v.get("fullatt_block_indexes", d.fullatt_block_indexes)
        ),
        out_hidden_size=int(v.get("out_hidden_size", d.out_hidden_size)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
    )


def _first(*values):
    return next(v for v in values if v is not None)


def _eos(value):
    return tuple(int(x) for x in value) if isinstance(value, list | tuple) else value


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id", _eos(self.eos_token_id))
        if self.vision is not None:
            if self.vision.out_hidden_size != self.text.hidden_size:
                raise ValueError(
                    f"vision out_hidden_size ({self.vision.out_hidden_size}) must equal the text "
                    f"hidden_size ({self.text.hidden_size})"
                )
            for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
                if not 0 <= getattr(self, name) < self.text.vocab_size:
                    raise ValueError(
                        f"VLMConfig.{name}={getattr(self, name)} is outside the vocabulary "
                        f"(vocab_size {self.text.vocab_size})"
                    )

    @classmethod
    def from_hf(
        cls,
        config: Mapping[str, Any],
        *,
        param_dtype: str = "float32",
        compute_dtype: str = "float32",
        remat: str = "none",
        strict: bool = True,
    ) -> VLMConfig:
        """VLMConfig from a `config.json` dict (Qwen2 or Qwen2.5-VL); dtypes/remat are ours."""
        model_type = config.get("model_type")
        dtypes = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
        if model_type == "qwen2":
            _check_known(config, _TEXT_USED | _TEXT_IGNORED, "config.json", strict)
            text = _text_config(
                config,
                "qwen2",
                bool(config.get("tie_word_embeddings", False)),
                remat=remat,
                **dtypes,
            )
            return cls(
                text=text,
                vision=None,
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
            )
        if model_type != "qwen2_5_vl":
            raise ValueError(
                f"config.json model_type {model_type!r} is not supported; pretzel_jax reads "
                "'qwen2' (Qwen2ForCausalLM) and 'qwen2_5_vl' (Qwen2.5-VL) checkpoints"
            )
        nested = config.get("text_config") or {}
        _check_known(config, _TEXT_USED | _TEXT_IGNORED, "config.json", strict)
        _check_known(nested, _TEXT_USED | _TEXT_IGNORED, "text_config", strict)
        # Hub layout: text fields at the top level; newer layouts nest them (nested wins).
        text = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
        text.update(nested)
        # transformers ties when either level asks for it.
        tied = bool(
            config.get("tie_word_embeddings", False) or nested.get("tie_word_embeddings", False)
        )
        vision = _vision_config(config.get("vision_config") or {}, strict, **dtypes)
        fields = cls.__dataclass_fields__
        ids = {
            name: int(_first(config.get(name), nested.get(name), fields[name].default))
            for name in _VISION_IDS
        }
        return cls(
            text=_text_config(text, "qwen2_5_vl", tied, remat=remat, **dtypes),
            vision=vision,
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=text.get("eos_token_id"),
            **ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json dict (transformers 5 layout) that Qwen2Config / Qwen2_5_VLConfig accept."""
        t = self.text
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        text = {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }
        if self.vision is None:
            return {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                **text,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            }
        v = self.vision
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
        }
        return {
            "model_type": "qwen2_5_vl",
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "text_config": {"model_type": "qwen2_5_vl_text", **text},
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "out_hidden_size": v.out_hidden_size,
                "hidden_act": "silu",
            },
        }
