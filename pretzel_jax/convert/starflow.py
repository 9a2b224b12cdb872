"""Port weights between apple/ml-starflow's `transformer_flow.Model` and our `LatentFlow`.

    python -m pretzel_jax.convert.starflow --in model.safetensors --config constructor.json \
        --out DIR                                     # -> an Orbax checkpoint `sample/` loads
    python -m pretzel_jax.convert.starflow --export DIR --out model.safetensors

Only safetensors are read: a PyTorch `.pth` must first be re-saved by its owner with
`torch.load(path, weights_only=True)` and `safetensors.torch.save_file(state_dict, out)`; we
never unpickle. The constructor JSON holds `Model.__init__`'s keyword arguments (either bare or
under "kwargs"). Supported: the released text-to-image family (LayerNorm or unit-offset
RMSNorm, GELU MLP, bias, SOS, softplus, soft clip, final norm, 2-D/3-D RoPE, GQA, text in the
deep block only); any other option is refused by name.

Name table (block i, layer j; torch Linear weights are (out, in), our kernels (in, out)):
  blocks.i.sos_embed (1,1,C)            blocks[i].sos (C,)
  blocks.i.proj_in|proj_txt|proj_out    blocks[i].proj_in|proj_ctx|proj_out
  blocks.i.final_norm.weight            blocks[i].final_norm.scale (both unit-offset)
  ...attn_blocks.j.attention.norm       layers.attn_norm[j]
  ...attn_blocks.j.attention.qkv        layers.attn.{q,k,v}[j]  (rows [q | k | v], head-major)
  ...attn_blocks.j.attention.proj       layers.attn.o[j]
  ...attn_blocks.j.mlp.norm             layers.mlp_norm[j]
  ...attn_blocks.j.mlp.main.0 / main.2  layers.mlp.up[j] / layers.mlp.down[j]
Buffers (`var`, `blocks.i.attn_mask`, `feat_rope.freqs_cos|sin`) carry no information: import
checks their shapes, export writes their constructor values so the reference loads strictly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.convert.safetensors_io import (
    ConversionError,
    mismatch_error,
    read_safetensors,
    write_safetensors,
)
from pretzel_jax.flow import FlowConfig
from pretzel_jax.flow.latent_flow import LatentFlow, LatentFlowConfig
from pretzel_jax.sample import latent_flow as store

# Constructor options with the values our port implements; anything else is refused by name.
_REQUIRED = {
    "rope": True,
    "use_swiglu": False,
    "use_qk_norm": False,
    "use_post_norm": False,
    "use_bias": True,
    "use_pretrained_lm": None,
    "use_mm_attn": False,
    "learnable_self_denoiser": False,
    "conditional_denoiser": False,
    "temporal_causal": 0,
    "shallow_block_local": False,
    "local_attn_window": None,
    "top_block_channels": None,
}
_NORMS = {"layer_norm": "layer_norm", "rms_norm": "rms_norm_unit"}
_TEXT_PAIRS = 8  # rotary pairs of the text axis in ml-starflow's 3-D RoPE


def read_constructor(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"constructor file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"constructor file {path} is not valid JSON: {e}") from None
    return data.get("kwargs", data)


def config_from_constructor(kwargs: dict, *, dtype: str = "float32") -> LatentFlowConfig:
    """ml-starflow `Model(**kwargs)` -> our LatentFlowConfig (refusing unsupported options)."""
    kw = dict(kwargs)

    def need(key):
        if key not in kw:
            raise ConversionError(f"constructor is missing `{key}`")
        return kw[key]

    for key, want in _REQUIRED.items():
        got = kw.get(key, want)
        if (bool(got) != want) if isinstance(want, bool) else (got != want):
            raise ConversionError(
                f"constructor option {key}={got!r} is not supported by the port (needs {want!r})"
            )
    channels, width = need("in_channels"), need("channels")
    patch, img = kw.get("patch_size", 1), need("img_size")
    head_dim = kw.get("head_dim", 64)
    heads = kw.get("num_heads") or width // head_dim
    if heads * head_dim != width:
        raise ConversionError(
            f"num_heads * head_dim = {heads * head_dim} must equal channels = {width}"
        )
    num_blocks = need("num_blocks")
    layers = need("layers_per_block")
    layers = [layers] if isinstance(layers, int) else list(layers)
    if len(layers) == 1:
        layers = layers * num_blocks
    if len(layers) != num_blocks:
        raise ConversionError(f"layers_per_block {layers} needs {num_blocks} entries")
    order = kw.get("seq_order", "L2R")
    if order not in ("L2R", "R2L"):
        raise ConversionError(f"seq_order {order!r} must be 'L2R' or 'R2L'")
    flip_parity = 0 if order == "L2R" else 1
    perms = tuple("flip" if i % 2 == flip_parity else "identity" for i in range(num_blocks))
    txt_size, txt_dim = kw.get("txt_size", 0), kw.get("txt_dim", 0)
    if txt_dim and not kw.get("cond_top_only", False):
        raise ConversionError("text in every block (cond_top_only=False) is not supported")
    half = head_dim // 2
    if txt_size:
        d = half - _TEXT_PAIRS
        if d <= 0 or d % 2:
            raise ConversionError(f"head_dim {head_dim} leaves no even row/col split for 3-D RoPE")
        sections = (d // 2, d // 2, _TEXT_PAIRS)
    else:
        if half % 2:
            raise ConversionError(f"head_dim {head_dim}: 2-D RoPE needs head_dim % 4 == 0")
        sections = (half // 2, half // 2)
    norm = kw.get("norm_type", "layer_norm")
    if norm not in _NORMS:
        raise ConversionError(f"norm_type {norm!r} must be one of {sorted(_NORMS)}")
    flow = FlowConfig(
        token_dim=channels * patch * patch,
        width=width,
        head_dim=head_dim,
        kv_heads=kw.get("num_kv_heads") or None,
        layers_per_block=tuple(layers),
        mlp_ratio=kw.get("expansion", 4),
        use_sos=bool(kw.get("sos", False)),
        use_softplus=bool(kw.get("use_softplus", False)),
        soft_clip=float(kw.get("soft_clip", 0) or 0),
        use_final_norm=bool(kw.get("use_final_norm", False)),
        context_dim=txt_dim if txt_size else 0,
        permutations=perms,
        norm=_NORMS[norm],
        norm_eps=1e-5 if norm == "layer_norm" else 1e-6,
        rope="sectioned",
        rope_sections=sections,
        rope_interleaved=not kw.get("hf_style_rope", False),
        param_dtype=dtype,
    )
    grid = img  # Model.img_size is the latent grid side
    return LatentFlowConfig(
        flow=flow,
        channels=channels,
        grid=(grid, grid),
        patch_size=patch,
        pt_seq_len=kw.get("pt_seq_len") or grid // patch,
        context_len=txt_size if txt_dim else 0,
    )


# -- the name table ---------------------------------------------------------------------------

# One entry: torch key -> (our flat path, layer index or None, to_torch, from_torch).
Entry = tuple[tuple, int | None, Callable, Callable]


def _linear(prefix: str, ours: tuple, layer: int | None) -> dict[str, Entry]:
    return {
        f"{prefix}.weight": (ours + ("kernel",), layer, np.transpose, np.transpose),
        f"{prefix}.bias": (ours + ("bias",), layer, _same, _same),
    }


def _norm(prefix: str, ours: tuple, layer: int | None, has_bias: bool) -> dict[str, Entry]:
    out = {f"{prefix}.weight": (ours + ("scale",), layer, _same, _same)}
    if has_bias:
        out[f"{prefix}.bias"] = (ours + ("bias",), layer, _same, _same)
    return out


def _same(a):
    return a


def _qkv_rows(cfg: FlowConfig) -> list[int]:
    q = cfg.width
    kv = (cfg.kv_heads or cfg.width // cfg.head_dim) * cfg.head_dim
    return [q, q + kv]  # split points of the packed rows [q | k | v]


def name_table(cfg: LatentFlowConfig) -> tuple[dict[str, Entry], dict[str, tuple]]:
    """(parameter entries, packed qkv keys -> (q, k, v) entries) for one config."""
    f = cfg.flow
    ln_bias = f.norm == "layer_norm"
    table: dict[str, Entry] = {}
    packed: dict[str, tuple] = {}
    for i, n_layers in enumerate(f.layers_per_block):
        b, ours = f"blocks.{i}", ("flow", "blocks", i)
        if f.use_sos:
            table[f"{b}.sos_embed"] = (
                ours + ("sos",),
                None,
                lambda a: a[None, None, :],
                lambda a: a.reshape(-1),
            )
        table |= _linear(f"{b}.proj_in", ours + ("proj_in",), None)
        table |= _linear(f"{b}.proj_out", ours + ("proj_out",), None)
        if i == f.num_blocks - 1 and f.context_dim:
            table |= _linear(f"{b}.proj_txt", ours + ("proj_ctx",), None)
        if f.use_final_norm:
            table |= _norm(f"{b}.final_norm", ours + ("final_norm",), None, False)
        lay = ours + ("layers", "layers")
        for j in range(n_layers):
            a = f"{b}.attn_blocks.{j}"
            table |= _norm(f"{a}.attention.norm", lay + ("attn_norm",), j, ln_bias)
            table |= _norm(f"{a}.mlp.norm", lay + ("mlp_norm",), j, ln_bias)
            table |= _linear(f"{a}.attention.proj", lay + ("attn", "o"), j)
            table |= _linear(f"{a}.mlp.main.0", lay + ("mlp", "up"), j)
            table |= _linear(f"{a}.mlp.main.2", lay + ("mlp", "down"), j)
            for kind in ("weight", "bias"):
                leaf = "kernel" if kind == "weight" else "bias"
                packed[f"{a}.attention.qkv.{kind}"] = tuple(
                    (lay + ("attn", p, leaf), j) for p in ("q", "k", "v")
                )
    return table, packed


def buffers(cfg: LatentFlowConfig) -> dict[str, np.ndarray]:
    """The reference's non-parameter state-dict entries, at their constructor values."""
    f = cfg.flow
    n = math.prod(cfg.token_grid)
    side = int(cfg.pt_seq_len) ** 2 + cfg.context_len
    out = {"var": np.ones((n, f.token_dim), np.float32)}
    for i in range(f.num_blocks):
        out[f"blocks.{i}.attn_mask"] = np.tril(np.ones((side, side), np.float32))
    out["feat_rope.freqs_cos"] = np.zeros((n + cfg.context_len, f.head_dim), np.float32)
    out["feat_rope.freqs_sin"] = np.zeros((n + cfg.context_len, f.head_dim), np.float32)
    return out


# -- import / export --------------------------------------------------------------------------


def _flat_params(model: nnx.Module) -> dict[tuple, jax.Array]:
    return {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def export_state_dict(model: LatentFlow, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our parameters -> the ml-starflow state dict (numpy, torch layout), buffers included."""
    cfg = model.config
    ours = {p: np.asarray(v, np.float32) for p, v in _flat_params(model).items()}
    table, packed = name_table(cfg)

    def get(path, layer):
        a = ours[path]
        return a if layer is None else a[layer]

    out = {k: to_t(get(p, j)) for k, (p, j, to_t, _) in table.items()}
    for key, parts in packed.items():
        arrs = [get(p, j) for p, j in parts]
        out[key] = np.concatenate([a.T if a.ndim == 2 else a for a in arrs], axis=0)
    out |= buffers(cfg)
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in out.items()}


def import_state_dict(tensors: dict[str, np.ndarray], cfg: LatentFlowConfig) -> LatentFlow:
    """ml-starflow state dict -> LatentFlow (parameters in cfg.flow.param_dtype). Every
    missing, unexpected or mis-shaped tensor is named in one ConversionError."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LatentFlow(cfg, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    shapes = {path: var.get_value().shape for path, var in flat}
    table, packed = name_table(cfg)
    tensors = _strip_wrapper_prefix(tensors)

    expected = _expected_shapes(table, packed, shapes)
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing tensor {key} {list(shape)}")
        elif tuple(tensors[key].shape) != shape:
            problems.append(
                f"tensor {key} has shape {list(tensors[key].shape)}, expected {list(shape)}"
            )
    problems += [
        f"unexpected tensor {key} {list(tensors[key].shape)}"
        for key in tensors
        if key not in expected and not _is_buffer(key)
    ]
    if problems:
        raise mismatch_error(
            "the state dict does not match the constructor",
            problems,
            "Check that --config is the constructor the checkpoint was trained with.",
        )

    values: dict[tuple, np.ndarray] = {}

    def put(path, layer, value):
        if layer is None:
            values[path] = value
        else:
            values.setdefault(path, np.zeros(shapes[path], np.float32))[layer] = value

    for key, (path, layer, _, from_t) in table.items():
        put(path, layer, from_t(np.asarray(tensors[key], np.float32)))
    for key, parts in packed.items():
        rows = np.split(np.asarray(tensors[key], np.float32), _qkv_rows(cfg.flow), axis=0)
        for (path, layer), part in zip(parts, rows, strict=True):
            put(path, layer, part.T if part.ndim == 2 else part)
    for path, var in flat:
        var.set_value(jnp.asarray(values[path], var.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _expected_shapes(table, packed, shapes) -> dict[str, tuple]:
    out = {}
    for key, (path, layer, to_t, _) in table.items():
        s = shapes[path] if layer is None else shapes[path][1:]
        out[key] = tuple(to_t(np.zeros(s, np.float32)).shape)
    for key, parts in packed.items():
        sizes = [shapes[p][1:] for p, _ in parts]
        rows = sum(s[-1] for s in sizes)
        out[key] = (rows, sizes[0][0]) if len(sizes[0]) == 2 else (rows,)
    return out


def _is_buffer(key: str) -> bool:
    # Constructor-valued; their sizes follow the caption length, so only their names are checked.
    return key in ("var", "feat_rope.freqs_cos", "feat_rope.freqs_sin") or key.endswith(
        ".attn_mask"
    )


def _strip_wrapper_prefix(tensors: dict) -> dict:
    """State dicts saved from DDP/FSDP or torch.compile prefix every key; drop a common one."""
    for prefix in ("module.", "_orig_mod.", "model."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def constructor_from_config(cfg: LatentFlowConfig) -> dict:
    """Our config -> ml-starflow `Model` kwargs; refuses configs the reference cannot express."""
    f = cfg.flow
    kw = {
        "in_channels": cfg.channels,
        "img_size": cfg.grid[0],
        "patch_size": cfg.patch_size,
        "channels": f.width,
        "num_blocks": f.num_blocks,
        "layers_per_block": list(f.layers_per_block),
        "head_dim": f.head_dim,
        "num_heads": f.width // f.head_dim,
        "num_kv_heads": f.kv_heads,
        "expansion": f.mlp_ratio,
        "rope": True,
        "pt_seq_len": cfg.pt_seq_len,
        "sos": f.use_sos,
        "use_softplus": f.use_softplus,
        "use_final_norm": f.use_final_norm,
        "soft_clip": f.soft_clip,
        "seq_order": "L2R" if f.block_permutations[0] == "flip" else "R2L",
        "norm_type": {v: k for k, v in _NORMS.items()}.get(f.norm, f.norm),
        "hf_style_rope": not f.rope_interleaved,
        "txt_size": cfg.context_len,
        "txt_dim": f.context_dim,
        "cond_top_only": bool(f.context_dim),
    }
    try:
        same = config_from_constructor(kw, dtype=f.param_dtype) == cfg
    except (ConversionError, ValueError) as e:
        raise ConversionError(f"this flow has no ml-starflow equivalent: {e}") from None
    if not same or cfg.grid[0] != cfg.grid[1] or f.mlp_kind != "gelu":
        raise ConversionError(
            "this flow has no ml-starflow equivalent (square grid, GELU MLP, sectioned RoPE, "
            "alternating permutations and text in the deep block only are required)"
        )
    return kw


# -- files and the command line ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Port ml-starflow weights to and from pretzel_jax."
    )
    parser.add_argument("--in", dest="inp", help="ml-starflow state dict (.safetensors)")
    parser.add_argument("--config", help="constructor.json: Model.__init__ kwargs")
    parser.add_argument("--export", help="our checkpoint directory to export instead")
    parser.add_argument("--out", required=True, help="checkpoint dir (import) or .safetensors")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    try:
        if args.export:
            if Path(args.out).exists():
                raise ConversionError(f"{args.out} exists; choose another --out")
            model = store.load(args.export)
            kwargs = constructor_from_config(model.config)
            write_safetensors(export_state_dict(model, dtype=np.dtype(args.dtype)), args.out)
            ctor = Path(args.out).with_suffix(".constructor.json")
            ctor.write_text(json.dumps({"kwargs": kwargs}, indent=2))
            print(f"wrote {args.out} and {ctor}")
        else:
            if not (args.inp and args.config):
                parser.error("import needs --in and --config (or use --export DIR)")
            cfg = config_from_constructor(read_constructor(args.config), dtype=args.dtype)
            model = import_state_dict(read_safetensors(args.inp), cfg)
            store.save(args.out, model, source=str(Path(args.inp).absolute()))
            print(f"wrote a latent-flow checkpoint to {args.out}")
    except (ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
