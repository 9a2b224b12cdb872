"""Kind "pretzel": the STARFlow2 joint model (`pretzel_jax.pretzel.Pretzel`) for one curriculum
stage, with its frozen parts restored after init as weight sources (never built from files
inside the jitted init, never written into checkpoints):

  vlm      the frozen VLM stream, from a Hugging Face folder (`model.pretzel.vlm_path`),
           each device reading its own slices (`convert.hf_qwen25vl.load(path, mesh=...)`)
  fae      the frozen FAE, from its `fae.safetensors` (`model.pretzel.fae_path`)
  others   (deep, shallow, adapter, w_vlm, w_d, taps) from the previous stage's
           `pretzel.safetensors` (`model.pretzel.init_from`): frozen where the stage freezes
           them, else initial values of trainable parameters (fresh start only)

The stage's freeze rule is checked at start (`FROZEN_BY_STAGE`): every parameter of a group the
stage must not train has to be frozen by `optim.freeze` (`stage_freeze(stage)` gives the
patterns), and each pattern must match something (the optimizer checks that).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from pretzel_jax.fae.encoders import QwenVisionEncoder
from pretzel_jax.fae.model import FAE
from pretzel_jax.models.common import defaults, flow_config, make, vlm_config
from pretzel_jax.models.fae import _first_blocks, fae_config
from pretzel_jax.models.registry import ModelKind, register
from pretzel_jax.pretzel import Pretzel, PretzelConfig
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.vlm import VisionConfig
from pretzel_jax.vlm.vision import VisionTower

FORMAT = "pretzel_jax.pretzel/1"
FILE = "pretzel.safetensors"
# PretzelConfig fields the layout fixes: config.data's, never a model key of their own.
FROM_DATA = ("latent_grid", "vlm_grid_stride")
GROUPS = ("deep", "shallow", "adapter", "w_vlm", "w_d", "taps")
# Parameter groups each stage must leave frozen (DESIGN.md section 3: the curriculum).
FROZEN_BY_STAGE = {
    1: ("vlm", "fae", "adapter", "w_vlm", "w_d", "taps"),
    2: ("vlm", "fae", "deep", "shallow", "w_vlm", "w_d", "taps"),
    3: ("vlm", "fae"),
}


def stage_freeze(stage: int, *, taps: bool = False) -> tuple[str, ...]:
    """`optim.freeze` patterns for `stage`; `taps`: the model has extra `vlm_taps` projections
    (a pattern must match some parameter)."""
    return tuple(f"^{g}/" for g in FROZEN_BY_STAGE[stage] if taps or g != "taps")


def default_config() -> dict:
    own = {k: v for k, v in defaults(PretzelConfig).items() if k not in FROM_DATA}
    return own | dict(
        vlm_path="",  # HF folder of the frozen VLM (the stage-0 VLM's `hf/` at toy scale)
        fae_path="",  # fae.safetensors of the frozen FAE
        init_from="",  # the previous stage's pretzel.safetensors ("" = fresh init)
        report=dict(
            t2i_per_category=16,  # GenEval-style prompts per category and split
            guidance=2.0,
            vqa_records=100,  # records of the VQA test split (3 questions each)
            bpd_batches=4,  # eval batches for the per-image bits/dim
            batch_size=32,
            max_answer_tokens=6,
            judge=True,  # score the text-to-image samples with the shapes judge
        ),
    )


def pretzel_config(config: ml_collections.ConfigDict) -> PretzelConfig:
    m = config.model
    vlm = vlm_config(m)
    if m.pretzel.vlm_path and Path(m.pretzel.vlm_path).exists():
        _check_vlm_folder(vlm, m.pretzel.vlm_path)
    kw = {k: v for k, v in m.pretzel.to_dict().items() if k in defaults(PretzelConfig)}
    kw["vlm_taps"] = tuple(kw["vlm_taps"])
    for key in FROM_DATA:  # a stage pipeline's; else PretzelConfig's default
        if key in config.data:
            kw[key] = config.data[key]
    flow = flow_config(m, m.fae.latent_channels)
    if not flow.context_dim:
        flow = dataclasses.replace(flow, context_dim=vlm.text.hidden_size)
    return make(PretzelConfig, dict(kw, vlm=vlm, flow=flow), "model.pretzel")


_CHECKED_TEXT = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "rms_norm_eps",
    "rope_theta",
    "mrope_section",
    "tie_word_embeddings",
)
_CHECKED_VISION = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "window_size",
    "fullatt_block_indexes",
    "out_hidden_size",
)


@functools.lru_cache(maxsize=4)
def _folder_config(path: str):
    from pretzel_jax.convert.hf_qwen25vl import read_config

    return read_config(path)


def _check_vlm_folder(vlm, path: str) -> None:
    """The VLM folder must hold the architecture config.model.vlm describes."""
    theirs = _folder_config(str(Path(path).resolve()))
    diffs = [
        f"text.{k}: config {getattr(vlm.text, k)!r}, folder {getattr(theirs.text, k)!r}"
        for k in _CHECKED_TEXT
        if getattr(vlm.text, k) != getattr(theirs.text, k)
    ]
    if (vlm.vision is None) != (theirs.vision is None):
        diffs.append("vision tower: one side has none")
    elif vlm.vision is not None:
        diffs += [
            f"vision.{k}: config {getattr(vlm.vision, k)!r}, folder {getattr(theirs.vision, k)!r}"
            for k in _CHECKED_VISION
            if getattr(vlm.vision, k) != getattr(theirs.vision, k)
        ]
    for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(vlm, k) != getattr(theirs, k):
            diffs.append(f"{k}: config {getattr(vlm, k)}, folder {getattr(theirs, k)}")
    if diffs:
        raise ConfigError(
            f"model.pretzel.vlm_path={path}: the VLM there does not match config.model.vlm ("
            + "; ".join(diffs[:8])
            + "); set config.model.vlm to the folder's architecture or point vlm_path at the "
            "VLM this experiment was written for"
        )


def _fae(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> FAE:
    """The FAE's architecture (random weights; the `fae` weight source fills them). The encoder's
    config comes from the folder at `model.fae.encoder.path` when it exists (its config.json
    only: no weights are read here), else from `model.fae.encoder.random`; a DINOv2 encoder
    takes the FAE section's param/compute dtypes and remat unless `random` sets them."""
    enc = config.model.fae.encoder
    kw = enc.random.to_dict() if enc.random is not None else {}
    folder = enc.path and Path(enc.path).exists()
    if enc.kind == "dinov2":
        from pretzel_jax.convert.hf_dinov2 import read_config
        from pretzel_jax.convert.safetensors_io import ConversionError
        from pretzel_jax.fae.encoders import DinoV2, DinoV2Config

        if enc.layers:
            raise ConfigError("model.fae.encoder.layers applies to qwen_vision only; set it to 0")
        ours = {k: config.model.fae[k] for k in ("param_dtype", "compute_dtype", "remat")}
        try:
            if folder:
                dino = dataclasses.replace(read_config(enc.path), **ours)
            else:
                dino = DinoV2Config(**(ours | kw))
        except (ConversionError, TypeError, ValueError) as e:
            where = f"encoder.path={enc.path}" if folder else "encoder.random"
            raise ConfigError(
                f"model.fae.{where}: not a DINOv2 config ({e}); point encoder.path at a "
                "Hugging Face DINOv2 folder or give DinoV2Config fields in encoder.random"
            ) from e
        encoder = DinoV2(dino, rngs=rngs)
        fae_cfg = fae_config(config.model, dino.patch_size, dino.hidden_size)
        return FAE(fae_cfg, encoder, rngs=rngs)
    if enc.kind != "qwen_vision":
        raise ConfigError(
            f"model.fae.encoder.kind={enc.kind!r}: the pretzel kind builds qwen_vision and "
            "dinov2 FAEs"
        )
    if folder:
        vision = _folder_config(str(Path(enc.path).resolve())).vision
    else:
        vision = VisionConfig(**kw)
    vision, _ = _first_blocks(vision, None, enc.layers)
    encoder = QwenVisionEncoder(VisionTower(vision, rngs=rngs))
    return FAE(fae_config(config.model, vision.patch_size, vision.hidden_size), encoder, rngs=rngs)


def build(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Pretzel:
    cfg = pretzel_config(config)
    fae = _fae(config, rngs=rngs)
    if fae.cfg.latent_channels != cfg.flow.token_dim:
        raise ConfigError(
            f"model.fae.latent_channels={fae.cfg.latent_channels} but the flow's token_dim is "
            f"{cfg.flow.token_dim}; leave model.flow.token_dim at 0 (= the FAE's channels)"
        )
    g = fae.cfg.feature_grid
    if tuple(cfg.latent_grid) != (g, g):
        raise ConfigError(
            f"config.data.latent_grid={tuple(cfg.latent_grid)} but the FAE makes {g}x{g} "
            "latents per image; set data.latent_grid to the FAE's grid"
        )
    return Pretzel(cfg, fae=fae, rngs=rngs)


# -- weight sources -------------------------------------------------------------------------


def _groups(config: ml_collections.ConfigDict):
    """(top-level group -> its "/"-joined parameter paths, the optimizer's ParamPolicy)."""
    from pretzel_jax.train.optimizer import param_policy

    abstract = nnx.state(nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = abstract.to_pure_dict()
    groups: dict[str, list[str]] = {}
    for k in flatten_dict(params):
        groups.setdefault(str(k[0]), []).append("/".join(map(str, k)))
    return groups, param_policy(params, config.optim)


def check_stage(stage: int, groups: dict[str, list[str]], policy) -> None:
    """The stage's freeze rule: every parameter of a frozen-by-design group is frozen."""
    bad = [q for g in FROZEN_BY_STAGE[stage] for q in groups.get(g, ()) if q in policy.trainable]
    if bad:
        raise ConfigError(
            f"model.pretzel.stage={stage} must not train {sorted({b.split('/')[0] for b in bad})}"
            f" ({len(bad)} parameters, e.g. {bad[0]}); add their patterns to optim.freeze "
            f"(pretzel_jax.models.pretzel.stage_freeze({stage}) = {stage_freeze(stage)})"
        )


def weight_sources(config: ml_collections.ConfigDict) -> list:
    from pretzel_jax.train.weights import WeightSource, load_safetensors

    p = config.model.pretzel
    groups, policy = _groups(config)
    check_stage(p.stage, groups, policy)
    sources = []
    needed = (("vlm_path", "the stage-0 VLM's hf/ folder"), ("fae_path", "fae.safetensors"))
    for key, what in needed:
        if not p[key]:
            raise ConfigError(
                f"model.pretzel.{key} is empty: the pretzel kind restores its frozen parts from "
                f"files; point it at {what}"
            )
        if not Path(p[key]).exists():
            raise ConfigError(
                f"model.pretzel.{key}={p[key]} does not exist; run the step that writes it "
                "(python -m pretzel_jax.curriculum runs them in order)"
            )
    sources.append(WeightSource("vlm", p.vlm_path, _vlm_loader(p.vlm_path, config.mesh.rules)))
    sources.append(WeightSource("fae", p.fae_path, load_safetensors(p.fae_path)))
    if p.init_from:
        if not Path(p.init_from).is_file():
            raise ConfigError(
                f"model.pretzel.init_from={p.init_from} does not exist: train the previous "
                "stage first (its run folder holds pretzel.safetensors)"
            )
        in_file = _file_groups(p.init_from)
        for group in GROUPS:
            paths = groups.get(group, [])
            if not paths or group not in in_file:
                continue
            frozen = [q for q in paths if q not in policy.trainable]
            if frozen and len(frozen) < len(paths):
                raise ConfigError(
                    f"optim.freeze freezes part of {group!r} ({frozen[0]} ...): freeze a whole "
                    "group or none of it"
                )
            names = functools.partial(_prefixed, group)
            load = load_safetensors(p.init_from, names)
            sources.append(WeightSource(group, p.init_from, load, "frozen" if frozen else "init"))
    return sources


def _prefixed(group: str, rel: tuple[str, ...]) -> str:
    return "/".join((group, *rel))


def _file_groups(path: str) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ConfigError(f"{path} is not a pretzel weights file (format {FORMAT})")
        return {k.split("/")[0] for k in f.keys()}  # noqa: SIM118


def _vlm_loader(path: str, rules) -> Callable:
    def load(abstract):
        from pretzel_jax.convert.hf_qwen25vl import load as load_hf

        leaf = jax.tree.leaves(abstract)[0]
        mesh = getattr(leaf.sharding, "mesh", None)
        dtype = jnp.dtype(leaf.dtype)
        vlm = load_hf(path, dtype=dtype, mesh=mesh, rules=tuple(rules))
        params = nnx.state(vlm, nnx.Param).to_pure_dict()
        return jax.tree.map(
            lambda a, t: jax.device_put(a.astype(t.dtype), t.sharding), params, abstract
        )

    return load


def save_weights(model: Pretzel, path: str | Path) -> Path:
    """Every parameter outside the frozen VLM and FAE, as the next stage's `init_from`."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param).to_pure_dict()
    flat = {
        "/".join(map(str, k)): np.ascontiguousarray(np.asarray(jax.device_get(v)))
        for k, v in flatten_dict(state).items()
        if k[0] in GROUPS
    }
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), {"format": FORMAT})
    tmp.replace(path)
    return path


def report(config: ml_collections.ConfigDict) -> Callable:
    from pretzel_jax.eval.pretzel_report import report as fn

    return fn


register(ModelKind("pretzel", default_config, build, report, weight_sources))
