"""Hugging Face DINOv2 folders (`Dinov2Model`, `Dinov2WithRegistersModel`) -> our `DinoV2`.

`load` reads `config.json` and `model.safetensors` (or the shards an index file names), checks
every tensor's name and shape against the config before reading any weight, and builds the model
on the default device.

Name table (hub layout, as `save_pretrained` writes it; i = layer; torch Linear weights are
(out, in), our kernels (in, out); per-layer tensors are stacked on axis 0 of our parameter):
  embeddings.cls_token (1, 1, D)                        cls_token (D,)
  embeddings.mask_token (1, D)                          mask_token (D,)   (use_mask_token)
  embeddings.register_tokens (1, R, D)                  register_tokens (R, D)   (R > 0)
  embeddings.position_embeddings (1, N+1, D)            position_embeddings (N+1, D)
  embeddings.patch_embeddings.projection.weight (D, C, P, P)  patch_embed.kernel (P*P*C, D)
  embeddings.patch_embeddings.projection.bias           patch_embed.bias
  encoder.layer.i.norm{1,2}.{weight,bias}               blocks.norm{1,2}.{scale,bias}[i]
  encoder.layer.i.attention.attention.{query,key,value}.{weight (T),bias}
                                                        blocks.attn.{q,k,v}.{kernel,bias}[i]
  encoder.layer.i.attention.output.dense.{weight (T),bias}  blocks.attn.o.{kernel,bias}[i]
  encoder.layer.i.layer_scale{1,2}.lambda1              blocks.layer_scale{1,2}[i]
  encoder.layer.i.mlp.fc{1,2}.{weight (T),bias}         blocks.mlp.{up,down}.{kernel,bias}[i]
  encoder.layer.i.mlp.weights_in.{weight,bias} (2H, D)  blocks.mlp.{gate,up}: rows [gate | up]
  encoder.layer.i.mlp.weights_out.{weight (T),bias}     blocks.mlp.down.{kernel,bias}[i]
  layernorm.{weight,bias}                               layernorm.{scale,bias}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.convert.safetensors_io import (
    ConversionError,
    SafetensorsFolder,
    mismatch_error,
    read_hf_config,
)
from pretzel_jax.fae.encoders import DinoV2, DinoV2Config


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # tensor name in the hub layout
    shape: tuple[int, ...]  # its shape there
    ours: tuple[str, ...]  # flat nnx path of our parameter
    layer: int | None  # index on our stacked axis 0, or None
    to_ours: Callable[[np.ndarray], np.ndarray]


def _same(a):
    return a


def _linear(a):
    return a.T


def name_table(cfg: DinoV2Config) -> list[Entry]:
    """Every (HF tensor, our parameter) pair of a checkpoint with this config. A SwiGLU
    `weights_in` tensor appears twice: its first half of rows is the gate, the second the up."""
    d, p, c, hid = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.mlp_hidden
    e = "embeddings."
    out = [
        Entry(f"{e}cls_token", (1, 1, d), ("cls_token",), None, lambda a: a.reshape(d)),
        Entry(
            f"{e}position_embeddings",
            (1, cfg.grid**2 + 1, d),
            ("position_embeddings",),
            None,
            lambda a: a[0],
        ),
        Entry(
            f"{e}patch_embeddings.projection.weight",
            (d, c, p, p),
            ("patch_embed", "kernel"),
            None,
            lambda a: a.transpose(2, 3, 1, 0).reshape(p * p * c, d),  # rows in (P, P, C) order
        ),
        Entry(f"{e}patch_embeddings.projection.bias", (d,), ("patch_embed", "bias"), None, _same),
    ]
    if cfg.use_mask_token:
        out.append(Entry(f"{e}mask_token", (1, d), ("mask_token",), None, lambda a: a[0]))
    if cfg.num_register_tokens:
        r = cfg.num_register_tokens
        out.append(
            Entry(f"{e}register_tokens", (1, r, d), ("register_tokens",), None, lambda a: a[0])
        )
    b = ("blocks",)
    for i in range(cfg.num_layers):
        pre = f"encoder.layer.{i}."

        def add(name, shape, ours, fn=_same, i=i, pre=pre):
            out.append(Entry(pre + name, shape, (*b, *ours), i, fn))

        for n in ("1", "2"):
            add(f"norm{n}.weight", (d,), (f"norm{n}", "scale"))
            add(f"norm{n}.bias", (d,), (f"norm{n}", "bias"))
            add(f"layer_scale{n}.lambda1", (d,), (f"layer_scale{n}",))
        for hf, ours in (("query", "q"), ("key", "k"), ("value", "v")):
            add(f"attention.attention.{hf}.weight", (d, d), ("attn", ours, "kernel"), _linear)
            if cfg.qkv_bias:
                add(f"attention.attention.{hf}.bias", (d,), ("attn", ours, "bias"))
        add("attention.output.dense.weight", (d, d), ("attn", "o", "kernel"), _linear)
        add("attention.output.dense.bias", (d,), ("attn", "o", "bias"))
        if cfg.use_swiglu_ffn:
            add(
                "mlp.weights_in.weight",
                (2 * hid, d),
                ("mlp", "gate", "kernel"),
                lambda a: a[:hid].T,
            )
            add("mlp.weights_in.weight", (2 * hid, d), ("mlp", "up", "kernel"), lambda a: a[hid:].T)
            add("mlp.weights_in.bias", (2 * hid,), ("mlp", "gate", "bias"), lambda a: a[:hid])
            add("mlp.weights_in.bias", (2 * hid,), ("mlp", "up", "bias"), lambda a: a[hid:])
            down = "weights_out"
        else:
            add("mlp.fc1.weight", (hid, d), ("mlp", "up", "kernel"), _linear)
            add("mlp.fc1.bias", (hid,), ("mlp", "up", "bias"))
            down = "fc2"
        add(f"mlp.{down}.weight", (d, hid), ("mlp", "down", "kernel"), _linear)
        add(f"mlp.{down}.bias", (d,), ("mlp", "down", "bias"))
    out.append(Entry("layernorm.weight", (d,), ("layernorm", "scale"), None, _same))
    out.append(Entry("layernorm.bias", (d,), ("layernorm", "bias"), None, _same))
    return out


def read_config(path: str | Path, dtype=jnp.float32) -> DinoV2Config:
    """config.json of an HF DINOv2 folder -> DinoV2Config with parameters (and compute) in
    `dtype`."""
    hf, file = read_hf_config(path, "a Hugging Face DINOv2 folder")
    name = jnp.dtype(dtype).name
    try:
        return DinoV2Config.from_hf(hf, param_dtype=name, compute_dtype=name)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{file}: {e}") from None


def _check(files: SafetensorsFolder, table: list[Entry]) -> None:
    """Every missing, unexpected or mis-shaped tensor named in one ConversionError."""
    expected = {e.hf: e.shape for e in table}
    present = set(files.names())
    problems = [f"missing tensor {n} {list(s)}" for n, s in expected.items() if n not in present]
    problems += [
        f"tensor {n} has shape {list(files.shape(n))}, expected {list(s)}"
        for n, s in expected.items()
        if n in present and files.shape(n) != s
    ]
    problems += [
        f"unexpected tensor {n} {list(files.shape(n))}" for n in sorted(present - set(expected))
    ]
    if problems:
        raise mismatch_error(
            f"the weights in {files.path} do not match its config.json",
            problems,
            "Check that config.json (num_hidden_layers, hidden_size, mlp_ratio, use_swiglu_ffn, "
            "num_register_tokens, image_size, model_type) belongs to these weights, or re-export "
            "the folder with transformers' save_pretrained.",
        )


def load(path: str | Path, dtype=jnp.float32) -> DinoV2:
    """A local HF DINOv2 folder -> DinoV2 with parameters in `dtype` (norm scales stay float32),
    on the default device."""
    path = Path(path)
    cfg = read_config(path, dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DinoV2(cfg, rngs=nnx.Rngs(0))))
    table = name_table(cfg)
    by_path: dict[tuple, list[Entry]] = {}
    for e in table:
        by_path.setdefault(e.ours, []).append(e)
    flat = list(nnx.to_flat_state(state))
    if {p for p, _ in flat} != set(by_path):  # a bug in this file, not in the user's folder
        raise AssertionError(
            f"name table and model disagree: {set(by_path) ^ {p for p, _ in flat}}"
        )
    with SafetensorsFolder(path) as files:
        _check(files, table)
        for p, var in flat:
            spec = var.get_value()
            entries = by_path[p]
            parts = [e.to_ours(files.read(e.hf).astype(np.float32)) for e in entries]
            value = np.stack(parts) if entries[0].layer is not None else parts[0]
            if value.shape != spec.shape:  # also a bug here: shapes were checked above
                raise AssertionError(f"{'.'.join(p)}: built {value.shape}, model {spec.shape}")
            var.set_value(jnp.asarray(value, spec.dtype))
    return nnx.merge(graphdef, state)
