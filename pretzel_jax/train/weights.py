"""Weight sources: pretrained weights restored into the sharded state after init.

A `WeightSource` names a "/"-joined parameter path prefix ("vlm", "flow/deep"), the file or
folder the weights come from, and a `load` function. `load` receives the abstract subtree under
the prefix (a nested dict of `jax.ShapeDtypeStruct`s, each with its `.sharding`) and returns the
arrays in exactly those shardings; `load_safetensors` makes such a function for a safetensors
file whose keys are the paths relative to the prefix, each device reading only its own slice.

Roles: "frozen" sources cover frozen parameters only (`optim.freeze`); they are loaded at every
start, never written into checkpoints, and a checkpoint records their path and `content_hash`, so
a resume with a different file fails. "init" sources initialise trainable parameters at a fresh
start only (e.g. a previous curriculum stage's weights); on resume the checkpoint's values win.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from pretzel_jax.train.errors import ConfigError
from pretzel_jax.train.optimizer import Params, path_str

ROLES = ("frozen", "init")
Loader = Callable[[Any], Any]  # abstract subtree (nested dict of ShapeDtypeStructs) -> arrays


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where the parameters under `prefix` come from (see the module docstring)."""

    prefix: str  # "/"-joined parameter path prefix: "vlm", "flow/deep", "dense1/kernel"
    path: str  # the file or folder read (recorded in checkpoints, named in errors)
    load: Loader  # abstract subtree under `prefix` -> arrays in exactly its shardings
    role: str = "frozen"  # "frozen" | "init"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", str(self.prefix).strip("/"))
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.prefix:
            raise ConfigError(
                f"weight source for {self.path}: the prefix is empty; name the parameter subtree "
                "it loads, e.g. 'vlm' or 'flow/deep'"
            )
        if self.role not in ROLES:
            raise ConfigError(
                f"weight source {self.prefix!r} ({self.path}): role {self.role!r} is unknown; "
                f"use one of {ROLES}"
            )

    def describe(self) -> str:
        return f"weight source {self.prefix!r} ({self.path})"


def safetensors_source(
    prefix: str,
    path: str | os.PathLike,
    *,
    role: str = "frozen",
    names: Callable[[tuple[str, ...]], str] | None = None,
) -> WeightSource:
    """A WeightSource reading `path` with `load_safetensors`."""
    return WeightSource(prefix, os.fspath(path), load_safetensors(path, names), role)


# --- safetensors -------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _castable(source: np.dtype, target: np.dtype) -> bool:
    """Float -> float, int/bool -> int or float, bool -> bool; never float -> int."""
    if jnp.issubdtype(target, jnp.floating):
        return jnp.issubdtype(source, jnp.number) or source == np.bool_
    if jnp.issubdtype(target, jnp.integer):
        return jnp.issubdtype(source, jnp.integer) or source == np.bool_
    return source == target


def _flat_named(tree: Any) -> dict[tuple[str, ...], Any]:
    """{path tuple of str keys: leaf} of a nested mapping (a bare leaf: {(): leaf})."""
    if not isinstance(tree, Mapping):
        return {(): tree}
    return {tuple(str(k) for k in path): leaf for path, leaf in flatten_dict(dict(tree)).items()}


def _listing(items: Sequence[str], limit: int = 12) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_safetensors(
    path: str | os.PathLike, names: Callable[[tuple[str, ...]], str] | None = None
) -> Loader:
    """A `WeightSource.load` for a safetensors file (or a Hugging Face folder of shards).

    The file's keys are the parameter paths relative to the source's prefix, "/"-joined
    ("kernel", "blocks/0/attn/q/kernel"), or `names(relative path tuple of str keys)`. Every
    name, shape and dtype cast (float -> float, int -> int or float) is checked before any array
    is made, and all problems are raised as one ConfigError naming the file. Without `names`
    the file must hold exactly the subtree (a tensor no parameter asks for is an error); with
    `names` it may hold more (one file shared by several sources, each mapping its own keys).
    Each parameter is made with `jax.make_array_from_callback` in its target sharding, so each
    device reads only its own slice from the memory-mapped file.
    """
    path = Path(path)

    def load(target: Any) -> Any:
        from pretzel_jax.convert.safetensors_io import ConversionError, SafetensorsFolder

        flat = _flat_named(target)
        if () in flat and names is None:
            raise ConfigError(
                f"{path}: the prefix names a single parameter, so the file key cannot be derived "
                "from it; pass names=lambda path: '<key in the file>' to load_safetensors"
            )
        key_of = {p: (names(p) if names is not None else "/".join(p)) for p in flat}
        if not path.exists():
            raise ConfigError(f"weights file {path} does not exist; fix the path")
        try:
            files = SafetensorsFolder(path)
        except ConversionError as e:
            raise ConfigError(str(e)) from None
        with files:
            problems = _safetensors_problems(files, flat, key_of, strict=names is None)
            if problems:
                raise ConfigError(
                    f"{path} does not hold the parameters it should load "
                    f"({len(problems)} problems):\n  " + "\n  ".join(problems) + "\nWrite the "
                    "file with one tensor per parameter, keyed by its path relative to the "
                    "source's prefix ('kernel' for '<prefix>/kernel'), in the shapes listed in "
                    "param_policy.txt, or pass names= to load_safetensors to map paths to keys"
                )
            arrays = {
                p: jax.make_array_from_callback(
                    leaf.shape, leaf.sharding, _reader(files, key_of[p], leaf)
                )
                for p, leaf in flat.items()
            }
        if () in arrays:
            return arrays[()]
        return unflatten_dict(arrays)

    return load


def _safetensors_problems(files, flat: dict, key_of: dict, strict: bool) -> list[str]:
    present = set(files.names())
    wanted = {key_of[p]: p for p in flat}
    missing = sorted(k for k in wanted if k not in present)
    unexpected = sorted(k for k in present if k not in wanted) if strict else []
    problems = []
    if len(wanted) < len(flat):
        twice = sorted({k for k in key_of.values() if list(key_of.values()).count(k) > 1})
        problems.append(f"names maps several parameters to one key: {_listing(twice)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    for key, p in wanted.items():
        if key not in present:
            continue
        leaf = flat[p]
        shape, dtype_name = files.shape(key), files.dtype(key)
        if tuple(shape) != tuple(leaf.shape):
            problems.append(f"{key}: shape {tuple(shape)} in the file, {tuple(leaf.shape)} wanted")
        dtype = _DTYPES.get(dtype_name)
        if dtype is None or not _castable(np.dtype(dtype), np.dtype(leaf.dtype)):
            problems.append(f"{key}: dtype {dtype_name} cannot be cast to {np.dtype(leaf.dtype)}")
    return problems


def _reader(files, key: str, leaf: jax.ShapeDtypeStruct):
    """make_array_from_callback's callback: block `index` of tensor `key`, in `leaf`'s dtype."""

    def read(index):
        if not leaf.shape:
            part = files.read(key)
        else:
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, leaf.shape, strict=True))
            part = files.read(key, index)
        return np.ascontiguousarray(part, dtype=leaf.dtype)

    return read


# --- content hashes ----------------------------------------------------------------------------

_HASHES: dict[tuple, str] = {}


def _files_of(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [("", path)]
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())


def content_hash(path: str | os.PathLike) -> str:
    """The sha256 ("sha256:<hex>") over the file, or over every file of a folder in sorted
    order (each preceded by its relative path). Cached per (path, size, mtime) within a
    process. Raises FileNotFoundError for a path that does not exist."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = _files_of(path)
    stamp = tuple((rel, f.stat().st_size, f.stat().st_mtime_ns) for rel, f in files)
    key = (str(path), stamp)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for rel, file in files:
            if rel:
                digest.update(rel.encode() + b"\0")
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
        _HASHES[key] = f"sha256:{digest.hexdigest()}"
    return _HASHES[key]


def source_records(sources: Sequence[WeightSource]) -> list[dict[str, str | None]]:
    """What a checkpoint records of each source: prefix, role, path, content hash (None when
    the path does not exist)."""
    records = []
    for s in sources:
        try:
            digest = content_hash(s.path)
        except FileNotFoundError:
            digest = None
        records.append({"prefix": s.prefix, "role": s.role, "path": s.path, "sha256": digest})
    return records


# --- coverage, checks and loading ----------------------------------------------------------------


def covers(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def covered_paths(sources: Sequence[WeightSource], params: Params) -> frozenset[str]:
    paths = [path_str(k) for k in flatten_dict(params)]
    return frozenset(p for p in paths if any(covers(s.prefix, p) for s in sources))


def check_sources(
    sources: Sequence[WeightSource], params: Params, trainable: frozenset[str]
) -> None:
    """One ConfigError listing every source whose prefix matches no parameter, every "frozen"
    source covering a trainable parameter, every "init" source covering a frozen one, and every
    parameter covered twice. `params`: every parameter (nested dict)."""
    paths = [path_str(k) for k in flatten_dict(params)]
    problems, owner = [], {}
    for s in sources:
        if not isinstance(s, WeightSource):
            problems.append(f"{s!r} is not a WeightSource")
            continue
        mine = [p for p in paths if covers(s.prefix, p)]
        if not mine:
            problems.append(
                f"{s.describe()}: prefix {s.prefix!r} matches no parameter; fix the prefix "
                f"(parameter paths look like {paths[0]!r}; see param_policy.txt)"
            )
            continue
        if s.role == "frozen":
            wrong = [p for p in mine if p in trainable]
            if wrong:
                problems.append(
                    f"{s.describe()} is 'frozen' but covers trainable parameters "
                    f"{_listing(wrong, 6)}; add them to optim.freeze (e.g. "
                    f"optim.freeze=('^{s.prefix}/',)) or give the source role 'init' to only "
                    "initialise them"
                )
        else:
            wrong = [p for p in mine if p not in trainable]
            if wrong:
                problems.append(
                    f"{s.describe()} is 'init' but covers frozen parameters "
                    f"{_listing(wrong, 6)}, which are not checkpointed (their loaded values "
                    "would be lost on resume); give it role 'frozen' or remove them from "
                    "optim.freeze"
                )
        for p in mine:
            if p in owner:
                problems.append(
                    f"{owner[p].describe()} and {s.describe()} both cover {p}; make the "
                    "prefixes disjoint"
                )
                break
            owner[p] = s
    if problems:
        raise ConfigError("invalid weight sources:\n  " + "\n  ".join(problems))


def missing_files(sources: Sequence[WeightSource]) -> None:
    """One ConfigError naming every source whose file or folder does not exist."""
    missing = [s for s in sources if not Path(s.path).exists()]
    if missing:
        raise ConfigError(
            "weight files do not exist:\n  "
            + "\n  ".join(f"{s.describe()}: {Path(s.path).absolute()} not found" for s in missing)
            + "\nFix the paths in the config (or create the files)"
        )


def subtree(params: Params, prefix: str) -> Any:
    """The part of `params` under `prefix` (a nested dict; a leaf for a parameter's full path),
    with the original key types."""
    flat = flatten_dict(params)
    n = len(prefix.split("/"))
    part = {k[n:]: v for k, v in flat.items() if covers(prefix, path_str(k))}
    if () in part:
        return part[()]
    return unflatten_dict(part)


def load_sources(sources: Sequence[WeightSource], abstract: Params) -> dict[tuple, jax.Array]:
    """{param path tuple: array} for every leaf the sources cover, from each source's `load`
    over its abstract subtree; checks every leaf's presence, shape, dtype and sharding."""
    flat_abstract = flatten_dict(abstract)
    out = {}
    for s in sources:
        mine = {k: v for k, v in flat_abstract.items() if covers(s.prefix, path_str(k))}
        try:
            loaded = s.load(subtree(abstract, s.prefix))
        except ConfigError as e:
            raise ConfigError(f"{s.describe()}: {e}") from None
        n = len(s.prefix.split("/"))
        got = _flat_named(loaded)
        want = {tuple(str(x) for x in k[n:]): k for k in mine}
        problems = []
        missing = sorted("/".join(r) or s.prefix for r in want if r not in got)
        extra = sorted("/".join(r) or s.prefix for r in got if r not in want)
        if missing:
            problems.append(f"no array for {_listing(missing)}")
        if extra:
            problems.append(f"arrays for unknown parameters {_listing(extra)}")
        for rel, key in want.items():
            if rel not in got:
                continue
            value, spec = got[rel], mine[key]
            name = path_str(key)
            if not isinstance(value, jax.Array):
                problems.append(f"{name}: a {type(value).__name__}, not a jax.Array")
            elif value.shape != spec.shape or value.dtype != spec.dtype:
                problems.append(
                    f"{name}: {value.dtype}{list(value.shape)}, wanted {spec.dtype}"
                    f"{list(spec.shape)}"
                )
            elif not (
                value.sharding == spec.sharding
                or value.sharding.is_equivalent_to(spec.sharding, len(spec.shape))
            ):
                problems.append(f"{name}: sharding {value.sharding}, wanted {spec.sharding}")
            else:
                out[key] = value
        if problems:
            raise ConfigError(
                f"{s.describe()}: its load function returned the wrong arrays:\n  "
                + "\n  ".join(problems)
                + "\nReturn one array per leaf of the abstract subtree it is given, in that "
                "leaf's shape, dtype and sharding (jax.make_array_from_callback(leaf.shape, "
                "leaf.sharding, ...)); load_safetensors does this"
            )
    return out
