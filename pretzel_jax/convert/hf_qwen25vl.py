"""Hugging Face Qwen2 / Qwen2.5-VL folders <-> our `Qwen25VL`.

    python -m pretzel_jax.convert.hf_qwen25vl --in HF_DIR --out DIR [--dtype bfloat16]

`load` reads `config.json` and `model.safetensors` (or the shards an index file names) tensor by
tensor: the model is built abstractly, then every parameter is made with
`jax.make_array_from_callback` directly in its target sharding, each device's callback reading
only its own slice (and, for layer-stacked parameters, only its layers) from the memory-mapped
files. No host copy of the whole model is made. `save` writes the hub layout that
`transformers`' `from_pretrained` loads.

Name table (i = layer / block; torch Linear weights are (out, in), our kernels (in, out);
per-layer tensors are stacked on axis 0 of our parameter):
  model.embed_tokens.weight                      text.embed
  model.layers.i.self_attn.{q,k,v}_proj.weight   text.layers.layers.attn.{q,k,v}.kernel[i]   (T)
  model.layers.i.self_attn.{q,k,v}_proj.bias     text.layers.layers.attn.{q,k,v}.bias[i]
  model.layers.i.self_attn.o_proj.weight         text.layers.layers.attn.o.kernel[i]         (T)
  model.layers.i.mlp.{gate,up,down}_proj.weight  text.layers.layers.mlp.{gate,up,down}.kernel[i] (T)
  model.layers.i.input_layernorm.weight          text.layers.layers.attn_norm.scale[i]
  model.layers.i.post_attention_layernorm.weight text.layers.layers.mlp_norm.scale[i]
  model.norm.weight                              text.norm.scale
  lm_head.weight                                 text.lm_head.kernel (T); absent when tied
  visual.patch_embed.proj.weight (D,C,T,P,P)     vision.patch_embed.kernel (C*T*P*P, D)
  visual.blocks.i.norm{1,2}.weight               vision.blocks.norm{1,2}.scale[i]
  visual.blocks.i.attn.qkv.weight (3D, D)        vision.blocks.attn.qkv.kernel[i] (D, 3, D)
  visual.blocks.i.attn.qkv.bias (3D,)            vision.blocks.attn.qkv.bias[i] (3, D)
  visual.blocks.i.attn.proj.{weight,bias}        vision.blocks.attn.proj.{kernel (T),bias}[i]
  visual.blocks.i.mlp.{gate,up,down}_proj.* vision.blocks.mlp.{gate,up,down}.{kernel (T),bias}[i]
  visual.merger.ln_q.weight                      vision.merger.ln_q.scale
  visual.merger.mlp.{0,2}.{weight,bias}          vision.merger.{fc1,fc2}.{kernel (T),bias}
Folders whose names use transformers' in-memory layout (`model.language_model.*`,
`model.visual.*`) load too; `save` always writes the hub layout above. Rotary `inv_freq` buffers
are skipped, and so is a `lm_head.weight` in a tied checkpoint (transformers ignores it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from pretzel_jax.convert.safetensors_io import (
    INDEX_FILE,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    ConversionError,
    SafetensorsFolder,
    mismatch_error,
    read_hf_config,
    write_sharded,
)
from pretzel_jax.nn.sharding import DEFAULT_RULES, Rules, named_shardings
from pretzel_jax.vlm.config import VLMConfig
from pretzel_jax.vlm.model import Qwen25VL

Index = tuple[slice, ...]
Reader = Callable[[Index | None], np.ndarray]  # reads (part of) one HF tensor


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one HF tensor becomes (one layer of) our parameter. `to_hf(ours)` uses only array
    methods, so it also runs under `jax.eval_shape` to predict HF shapes. `read(reader, index)`
    returns ours[index] reading only what it needs from the HF tensor."""

    name: str
    to_hf: Callable
    read: Callable[[Reader, Index], np.ndarray]


def _shift(s: slice, offset: int) -> slice:
    return slice(s.start + offset, s.stop + offset)


def _fused_qkv(dim: int) -> tuple[Transform, Transform]:
    """HF's packed qkv (3D, in) rows [q | k | v] <-> our FusedQKV kernel (in, 3, D), bias (3, D):
    ours[i, k, h] = hf[k*D + h, i]; a shard reads one row band per q/k/v part it holds."""

    def kernel(reader, index):
        i, k, h = index
        parts = [reader((_shift(h, j * dim), i)) for j in range(k.start, k.stop)]
        return np.stack(parts, 0).transpose(2, 0, 1)

    def bias(reader, index):
        k, h = index
        return np.stack([reader((_shift(h, j * dim),)) for j in range(k.start, k.stop)], 0)

    return (
        Transform("qkv", lambda a: a.transpose(1, 2, 0).reshape(-1, a.shape[0]), kernel),
        Transform("qkv_bias", lambda a: a.reshape(-1), bias),
    )


SAME = Transform("same", lambda a: a, lambda reader, index: reader(index))
LINEAR = Transform("linear", lambda a: a.T, lambda reader, index: reader((index[1], index[0])).T)


def _conv(patch: tuple[int, ...]) -> Transform:
    """Conv3d patch embed (D, C, T, P, P) as a matmul kernel (C*T*P*P, D); small, read whole."""
    return Transform(
        "conv",
        lambda a: a.T.reshape(a.shape[1], *patch),
        lambda reader, index: reader(None).reshape(-1, int(np.prod(patch))).T[index],
    )


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # name in the hub layout
    ours: tuple[str, ...]  # flat nnx path of our parameter
    layer: int | None  # index on our stacked axis 0, or None
    transform: Transform


def name_table(cfg: VLMConfig) -> list[Entry]:
    """Every HF tensor of a checkpoint with this config, in file order."""
    t = cfg.text
    out = [Entry("model.embed_tokens.weight", ("text", "embed"), None, SAME)]
    lay = ("text", "layers", "layers")
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        for x in "qkv":
            out.append(
                Entry(f"{p}self_attn.{x}_proj.weight", (*lay, "attn", x, "kernel"), i, LINEAR)
            )
            out.append(Entry(f"{p}self_attn.{x}_proj.bias", (*lay, "attn", x, "bias"), i, SAME))
        out.append(Entry(f"{p}self_attn.o_proj.weight", (*lay, "attn", "o", "kernel"), i, LINEAR))
        for x in ("gate", "up", "down"):
            out.append(Entry(f"{p}mlp.{x}_proj.weight", (*lay, "mlp", x, "kernel"), i, LINEAR))
        out.append(Entry(f"{p}input_layernorm.weight", (*lay, "attn_norm", "scale"), i, SAME))
        out.append(
            Entry(f"{p}post_attention_layernorm.weight", (*lay, "mlp_norm", "scale"), i, SAME)
        )
    out.append(Entry("model.norm.weight", ("text", "norm", "scale"), None, SAME))
    if not t.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("text", "lm_head", "kernel"), None, LINEAR))
    v = cfg.vision
    if v is None:
        return out
    patch = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out.append(
        Entry(
            "visual.patch_embed.proj.weight",
            ("vision", "patch_embed", "kernel"),
            None,
            _conv(patch),
        )
    )
    qkv, qkv_bias = _fused_qkv(v.hidden_size)
    blk = ("vision", "blocks")
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        out.append(Entry(f"{p}norm1.weight", (*blk, "norm1", "scale"), i, SAME))
        out.append(Entry(f"{p}norm2.weight", (*blk, "norm2", "scale"), i, SAME))
        out.append(Entry(f"{p}attn.qkv.weight", (*blk, "attn", "qkv", "kernel"), i, qkv))
        out.append(Entry(f"{p}attn.qkv.bias", (*blk, "attn", "qkv", "bias"), i, qkv_bias))
        out.append(Entry(f"{p}attn.proj.weight", (*blk, "attn", "proj", "kernel"), i, LINEAR))
        out.append(Entry(f"{p}attn.proj.bias", (*blk, "attn", "proj", "bias"), i, SAME))
        for x in ("gate", "up", "down"):
            out.append(Entry(f"{p}mlp.{x}_proj.weight", (*blk, "mlp", x, "kernel"), i, LINEAR))
            out.append(Entry(f"{p}mlp.{x}_proj.bias", (*blk, "mlp", x, "bias"), i, SAME))
    out.append(
        Entry("visual.merger.ln_q.weight", ("vision", "merger", "ln_q", "scale"), None, SAME)
    )
    for hf, ours in (("0", "fc1"), ("2", "fc2")):
        m = ("vision", "merger", ours)
        out.append(Entry(f"visual.merger.mlp.{hf}.weight", (*m, "kernel"), None, LINEAR))
        out.append(Entry(f"visual.merger.mlp.{hf}.bias", (*m, "bias"), None, SAME))
    return out


# transformers' in-memory names -> hub names; buffers that carry no weights.
_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def hub_name(key: str) -> str:
    for alias, hub in _ALIASES:
        if key.startswith(alias):
            return hub + key[len(alias) :]
    return key


# -- load -------------------------------------------------------------------------------------


def read_config(path: str | Path, dtype=jnp.float32) -> VLMConfig:
    """config.json of an HF folder -> VLMConfig with parameters (and compute) in `dtype`."""
    hf, file = read_hf_config(path, "a Hugging Face model folder")
    name = jnp.dtype(dtype).name
    try:
        return VLMConfig.from_hf(hf, param_dtype=name, compute_dtype=name)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{file}: {e}") from None


def load(
    path: str | Path, dtype=jnp.float32, mesh: Mesh | None = None, rules: Rules | None = None
) -> Qwen25VL:
    """A local HF Qwen2.5-VL (or plain Qwen2: then `vision` is None) folder -> Qwen25VL with
    parameters in `dtype` (norm scales stay float32), sharded over `mesh` by the parameters'
    logical axes and `rules` (default DEFAULT_RULES), or on the default device without a mesh."""
    path = Path(path)
    cfg = read_config(path, dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))))
    table = name_table(cfg)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(named_shardings(state, mesh, rules or DEFAULT_RULES)))
    with SafetensorsFolder(path) as files:
        keys = _match(files, table, state, cfg)
        by_path: dict[tuple, list[Entry]] = {}
        for e in table:
            by_path.setdefault(e.ours, []).append(e)
        for p, var in nnx.to_flat_state(state):
            spec = var.get_value()
            sharding = (
                shardings[p].get_value()
                if mesh is not None
                else SingleDeviceSharding(jax.devices()[0])
            )
            fill = _filler(files, keys, by_path[p], spec.shape, spec.dtype)
            var.set_value(jax.make_array_from_callback(spec.shape, sharding, fill))
    return nnx.merge(graphdef, state)


def _filler(files, keys, entries, shape, dtype):
    """Callback for make_array_from_callback: our parameter's block `index`, from the files."""

    def reader(entry):
        return lambda idx: files.read(keys[entry.hf], idx)

    def fill(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
        if entries[0].layer is None:
            (e,) = entries
            part = e.transform.read(reader(e), index)
        else:
            layers = range(index[0].start, index[0].stop)
            part = np.stack(
                [entries[j].transform.read(reader(entries[j]), index[1:]) for j in layers]
            )
        return np.ascontiguousarray(part, dtype=dtype)

    return fill


def _hf_shapes(table: list[Entry], state) -> dict[str, tuple[int, ...]]:
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(state)}
    out, seen = {}, {}
    for e in table:
        s = shapes[e.ours] if e.layer is None else shapes[e.ours][1:]
        if (e.transform, s) not in seen:
            spec = jax.ShapeDtypeStruct(s, jnp.float32)
            seen[e.transform, s] = jax.eval_shape(e.transform.to_hf, spec).shape
        out[e.hf] = seen[e.transform, s]
    return out


def _match(files: SafetensorsFolder, table: list[Entry], state, cfg: VLMConfig) -> dict[str, str]:
    """hub name -> key in the files; every missing, unexpected or mis-shaped tensor is named in
    one ConversionError."""
    ours = {p for p, _ in nnx.to_flat_state(state)}
    if ours != {e.ours for e in table}:  # a bug in this file, not in the user's folder
        raise AssertionError(f"name table and model disagree: {ours ^ {e.ours for e in table}}")
    expected = _hf_shapes(table, state)
    keys: dict[str, str] = {}
    problems = []
    for key in files.names():
        name = hub_name(key)
        if name in keys:
            problems.append(f"tensor {name} is stored twice, as {keys[name]} and {key}")
        keys[name] = key
    for name, shape in expected.items():
        if name not in keys:
            problems.append(f"missing tensor {name} {list(shape)}")
        elif files.shape(keys[name]) != shape:
            problems.append(
                f"tensor {keys[name]} ({files.file_of[keys[name]].name}) has shape "
                f"{list(files.shape(keys[name]))}, expected {list(shape)}"
            )
    tied_head = cfg.text.tie_word_embeddings and "lm_head.weight" in keys
    for name, key in keys.items():
        skip = name.endswith(_BUFFER_SUFFIXES) or (tied_head and name == "lm_head.weight")
        if name not in expected and not skip:
            problems.append(
                f"unexpected tensor {key} {list(files.shape(key))} ({files.file_of[key].name})"
            )
    if problems:
        raise mismatch_error(
            f"the weights in {files.path} do not match its config.json",
            problems,
            "Check that config.json (num_hidden_layers, hidden_size, vocab_size, "
            "tie_word_embeddings, vision_config) belongs to these weights, or re-export the folder "
            "with save_pretrained.",
        )
    return keys


# -- save -------------------------------------------------------------------------------------


def save(
    model: Qwen25VL,
    path: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> list[str]:
    """Write config.json and the weights in the hub layout (one `model.safetensors`, or shards
    of at most `max_shard_bytes` plus the index file) in each parameter's dtype; transformers'
    `from_pretrained` loads the folder. Tensors are gathered to the host one shard at a time.
    -> the weight file names."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{path} is a file; save writes a folder: choose a folder path")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"{path} exists and is not empty; choose another folder or pass overwrite=True"
            )
        for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
            old.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    table = {e.hf: e for e in name_table(cfg)}
    shapes = _hf_shapes(list(table.values()), nnx.state(model, nnx.Param))

    def produce(name: str) -> np.ndarray:
        e = table[name]
        value = params[e.ours] if e.layer is None else _take_layer(params[e.ours], e.layer)
        return np.ascontiguousarray(e.transform.to_hf(np.asarray(jax.device_get(value))))

    hf = cfg.to_hf()
    hf["dtype"] = jnp.dtype(params[("text", "embed")].dtype).name
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    specs = [(k, shapes[k], params[e.ours].dtype) for k, e in table.items()]
    return write_sharded(
        path, specs, produce, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}
    )


@jax.jit
def _take_layer(stacked: jax.Array, layer) -> jax.Array:
    # A traced index: one compile per parameter shape, not one per layer.
    return jax.lax.dynamic_index_in_dim(stacked, layer, 0, keepdims=False)


# -- command line -----------------------------------------------------------------------------

_WEIGHT_FILES = ("config.json", SINGLE_FILE, INDEX_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Import a Hugging Face Qwen2 / Qwen2.5-VL folder and export it again "
        "(a round trip through our model; other files such as the tokenizer are copied)."
    )
    parser.add_argument("--in", dest="inp", required=True, help="HF model folder")
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        model = load(args.inp, dtype=jnp.dtype(args.dtype))
        files = save(model, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))
        for extra in sorted(Path(args.inp).iterdir()):
            weights = extra.name in _WEIGHT_FILES or extra.suffix in (
                ".safetensors",
                *PICKLE_SUFFIXES,
            )
            if extra.is_file() and not weights:
                shutil.copy2(extra, Path(args.out) / extra.name)
        print(f"wrote {args.out} ({len(files)} weight file(s))")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
