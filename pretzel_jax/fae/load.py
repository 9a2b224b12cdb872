"""`load(path)`: an FAE rebuilt from its `fae.safetensors` alone (`pretzel_jax.fae.weights`): the
FAE config and the frozen encoder's kind and config from the file's metadata, every tensor from
the file (names and shapes checked). No experiment config, encoder folder or training code is
needed:

    from pretzel_jax import fae
    model = fae.load("runs/fae_dinov2g_adapt/fae.safetensors")
    latents = model.encode(images)          # (B, h, w, C), normalised
    images = model.decode(latents)          # (B, R, R, 3) in [0, 1]

Files written before the encoder's config was recorded need it passed: `encoder_config` = a
`DinoV2Config`, a `pretzel_jax.vlm.VisionConfig` (a Qwen2.5-VL tower, cut to the blocks the FAE
ran), or {"kind": "dinov2" | "qwen_vision", "config": {fields}}; it also overrides a recorded
one (e.g. other compute dtypes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from pretzel_jax.fae import weights
from pretzel_jax.fae.encoders import DinoV2, DinoV2Config, QwenVisionEncoder
from pretzel_jax.fae.model import FAE, FAEConfig
from pretzel_jax.fae.weights import FAEWeightsError

ENCODER_KINDS = ("dinov2", "qwen_vision")


def load(path: str | Path, encoder_config=None) -> FAE:
    """The FAE saved at `path` (parameters on the default device, in the saved configs' param
    dtypes). `encoder_config`: see the module docstring; None = the one recorded in the file."""
    config, recorded = weights.read_metadata(path)
    if encoder_config is None and recorded is None:
        raise FAEWeightsError(
            f"FAE weights {path} do not record their encoder's config (written before "
            "pretzel_jax.fae.weights saved it): pass it, fae.load(path, encoder_config=...) with "
            "the DinoV2Config or vlm.VisionConfig the FAE was trained with; saving the loaded "
            "FAE again records it"
        )
    kind, enc_cfg = _encoder_spec(encoder_config if encoder_config is not None else recorded, path)
    fae_cfg = _dataclass(FAEConfig, config, path, "FAE config")

    def build():
        encoder = _encoder(kind, enc_cfg)
        return FAE(fae_cfg, encoder, rngs=nnx.Rngs(0))

    model = nnx.eval_shape(build)  # no random init: every parameter comes from the file
    weights.load_into(model, weights.read(path), path)
    return model


def _encoder(kind: str, cfg):
    if kind == "dinov2":
        return DinoV2(cfg, rngs=nnx.Rngs(0))
    # `fae` may not import `vlm` at module level (DESIGN.md section 5: fae imports only nn and
    # kernels); the Qwen vision tower is needed only here, for an FAE built on one.
    from pretzel_jax.vlm.vision import VisionTower

    return QwenVisionEncoder(VisionTower(cfg, rngs=nnx.Rngs(0)))


def _encoder_spec(spec, path) -> tuple[str, object]:
    """-> (kind, DinoV2Config | VisionConfig) from a config object or a {"kind", "config"}."""
    # Imported here for the same reason as in _encoder.
    from pretzel_jax.vlm.vision import VisionConfig

    if isinstance(spec, DinoV2Config):
        return "dinov2", spec
    if isinstance(spec, VisionConfig):
        return "qwen_vision", spec
    if isinstance(spec, dict) and set(spec) == {"kind", "config"}:
        kind = spec["kind"]
        if kind not in ENCODER_KINDS:
            raise FAEWeightsError(
                f"FAE weights {path}: encoder kind {kind!r} is unknown; use one of {ENCODER_KINDS}"
            )
        cls = DinoV2Config if kind == "dinov2" else VisionConfig
        return kind, _dataclass(cls, spec["config"], path, f"{kind} encoder config")
    raise FAEWeightsError(
        f"encoder_config for {path} must be a DinoV2Config, a vlm.VisionConfig or "
        f'{{"kind": "dinov2" | "qwen_vision", "config": {{...}}}}, not {type(spec).__name__}'
    )


def _dataclass(cls, fields, path, what: str):
    """cls(**fields) with JSON lists back as tuples; a field this version does not know (a file
    from another version) or a bad value raises one error naming the file."""
    if not isinstance(fields, dict):
        raise FAEWeightsError(f"FAE weights {path}: the {what} is not a JSON object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        if unknown:
            raise TypeError(f"unknown fields {unknown}")
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise FAEWeightsError(
            f"FAE weights {path}: the recorded {what} does not fit this version of pretzel_jax "
            f"({e}); write the file again with this version"
        ) from None
