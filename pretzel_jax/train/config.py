"""Training configuration: every knob with one default, experiment loading and validation.

An experiment file `experiments/X.py` defines `get_config(arg=None)`, which starts from
`default_config()` and changes fields. The default config is locked, so a typo'd key fails where
it is written; `load_config` additionally applies command-line overrides (`train.steps=100`) and
validates the result, raising one `ConfigError` that names every bad key and its fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
from ml_collections import ConfigDict

from pretzel_jax.nn.sharding import DEFAULT_RULES, MESH_AXES
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.train.mesh import mesh_shape

__all__ = ["ConfigError", "default_config", "load_config", "validate"]

SCHEDULES = ("cosine", "constant")
PROGRESS_BAR = ("auto", "on", "off")


def default_config() -> ConfigDict:
    """The full training config with one default per knob (locked: unknown keys fail)."""
    c = ConfigDict()
    c.seed = 0  # model init and per-step keys (the data order has its own `data.seed`)
    c.run_dir = ""  # empty: the CLI uses runs/<experiment name>

    # Mesh axis sizes (-1: all remaining devices) and the logical-axis -> mesh-axis rules.
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "rules": DEFAULT_RULES})
    # A parameter this large (MiB) whose rules ask for mesh axes that its sizes do not divide is
    # an error at start, not a silent full copy on every device.
    c.mesh.replicated_limit_mib = 16.0

    c.optim = ConfigDict(
        {
            "lr": 1e-4,  # peak learning rate
            "schedule": "cosine",  # "cosine" (warm-up, cosine to min_lr) | "constant" (warm-up)
            "warmup_steps": 1000,  # linear warm-up from min_lr
            "min_lr": 1e-6,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 1e-4,
            "grad_clip": 0.0,  # global-norm clip over trainable params; 0 = off
            # Regexes searched in "/"-joined param paths ("flow/blocks/0/attn/q/kernel"). A
            # pattern that matches no parameter is an error.
            "freeze": (),
            "no_decay": (r"(bias|scale|norm|sos|embed)",),
        }
    )

    c.train = ConfigDict(
        {
            "steps": 100_000,
            # Gradient accumulation: a step runs its batch as this many equal slices, one after
            # another (activation memory / microbatches), and averages their gradients.
            "microbatches": 1,
            "log_every": 50,
            "eval_every": 0,  # 0 = no periodic eval
            "eval_batches": 8,  # batches per eval (fewer if the eval split ends first)
            "ckpt_every": 1000,  # 0 = only at the end and on SIGTERM
            "keep_checkpoints": 3,
            "async_checkpoint": True,
            "max_consecutive_nonfinite": 20,  # skipped steps in a row before NonFiniteError
            "progress_bar": "auto",  # "auto" (when stdout is a TTY) | "on" | "off"
        }
    )

    c.data = ConfigDict(
        {
            "name": "",
            "data_dir": "",
            "train_split": "train",
            "eval_split": "test",
            "batch_size": 256,  # global (all processes); each process reads batch_size/processes
            "eval_batch_size": 256,
            "num_workers": 0,
            "seed": 0,
            "shuffle": True,
            "drop_remainder": True,
        }
    )

    c.model = _default_model_config()
    c.lock()
    return c


def _default_model_config() -> ConfigDict:
    # Imported lazily: the registry pulls in every model, and train/ itself stays model-agnostic.
    from pretzel_jax import models

    return models.default_model_config()


def load_config(
    path_or_module: str | Path | ModuleType,
    arg: str | None = None,
    overrides: Sequence[str] = (),
    *,
    device_count: int | None = None,
    process_count: int | None = None,
) -> ConfigDict:
    """Config from an experiment file (`experiments/x.py`, `experiments/x.py:arg`), a module name
    (`experiments.x`) or a module, with `overrides` like `"train.steps=100"` applied, validated
    against `device_count`/`process_count` (default: this JAX runtime's)."""
    module, name, file_arg = _load_experiment(path_or_module)
    arg = arg if arg is not None else file_arg
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"{name} has no get_config(arg=None) function; define one that starts from "
            "pretzel_jax.train.config.default_config() and changes fields"
        )
    try:
        config = get_config() if arg is None else get_config(arg)
    except (AttributeError, KeyError, TypeError) as e:
        # Typos against the locked defaults land here (ml_collections names the key).
        raise ConfigError(f"{name}: get_config({arg!r}) failed: {_message(e)}") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{name}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    apply_overrides(config, overrides)
    validate(config, device_count=device_count, process_count=process_count)
    return config


def _load_experiment(target: str | Path | ModuleType) -> tuple[ModuleType, str, str | None]:
    if isinstance(target, ModuleType):
        return target, target.__name__, None
    text, arg = str(target), None
    if ".py:" in text:
        text, arg = text.split(".py:", 1)
        text += ".py"
    path = Path(text)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise ConfigError(f"experiment file {path} does not exist; check the --config path")
        spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, str(path), arg
    try:
        return importlib.import_module(text), text, arg
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"cannot import experiment {text!r} ({e}); pass a file path like experiments/x.py"
        ) from e


CLI_PREFIX = "--config."


def cli_overrides(tokens: Sequence[str], error: Callable[[str], Any]) -> list[str]:
    """`--config.a.b=v` or `--config.a.b v` command-line tokens -> ["a.b=v", ...]; `error` (an
    argparse parser's) reports a malformed token."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith(CLI_PREFIX):
            error(f"unrecognized argument {token!r}")
        key = token[len(CLI_PREFIX) :]
        if "=" not in key:
            if i + 1 == len(tokens):
                error(f"{token} needs a value ({token}=VALUE)")
            i += 1
            key = f"{key}={tokens[i]}"
        out.append(key)
        i += 1
    return out


def load_experiment(path: str | Path) -> ModuleType:
    """The module of an experiment file (for experiment files built on another one)."""
    return _load_experiment(Path(path))[0]


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `"a.b.c=value"` strings; the value is parsed as the type of the current field
    (lists/tuples: a Python literal or comma-separated strings)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parent, leaf = _lookup(config, key)
        current = parent[leaf]
        if isinstance(current, ConfigDict):
            raise ConfigError(f"{key} is a config section; override its fields ({key}.<name>=...)")
        value = _parse(raw, current, key)
        try:
            parent[leaf] = value
        except TypeError as e:
            raise ConfigError(
                f"{key}={raw!r}: expected {_kind(current)} (current value {current!r})"
            ) from e


def _kind(value: Any) -> str:
    """How an error names the type a field expects."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(type(value), "a list" if isinstance(value, list | tuple) else "a value")


def _lookup(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    """(section, field name) of an existing dotted key."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            known = list(node) if isinstance(node, ConfigDict) else []
            raise ConfigError(_unknown_key(".".join(parts[: i + 1]), known))
        parent, node = node, node[part]
    return parent, parts[-1]


def _unknown_key(key: str, known: Sequence[str]) -> str:
    section, _, leaf = key.rpartition(".")
    guess = difflib.get_close_matches(leaf, list(known), n=1)
    if guess:
        fix = f"did you mean {section + '.' if section else ''}{guess[0]}?"
    else:
        fix = f"known keys{' in ' + section if section else ''}: {', '.join(known)}"
    return f"unknown config key {key!r}; {fix}"


def _parse(raw: str, current: Any, key: str) -> Any:
    text = raw.strip()
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    if isinstance(current, int | float):
        try:
            return type(current)(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected {_kind(current)}") from None
    if isinstance(current, str):
        return _literal(text) if text[:1] in "'\"" else text
    if isinstance(current, list | tuple):
        value = _literal(text)
        if isinstance(value, list | tuple):
            return type(current)(value)
        return type(current)(s.strip() for s in text.split(",") if s.strip())
    return _literal(text)  # None-valued fields take any literal, else the raw string


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _message(e: BaseException) -> str:
    # ml_collections wraps its messages in quotes with escaped newlines.
    text = str(e).strip("'\"").replace("\\n", " ")
    return re.sub(r"Other fields present: .*?(Did you mean|$)", r"\1", text).strip()


def validate(
    config: ConfigDict, *, device_count: int | None = None, process_count: int | None = None
) -> None:
    """Raise one ConfigError listing every unknown/missing key and impossible combination."""
    problems = _key_problems(config, _reference_config(config))
    if problems:  # the checks below read fields that might not exist
        raise ConfigError(_report(problems))
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    problems += _mesh_problems(config, device_count, process_count)
    problems += _optim_problems(config.optim, config.train.steps)
    problems += _train_problems(config.train)
    problems += _data_problems(config.data)
    if problems:
        raise ConfigError(_report(problems))


def _data_problems(data: ConfigDict) -> list[str]:
    """A single-data-set pipeline must name a known data set (stage pipelines name theirs per
    task and are checked when they open them)."""
    if not data.get("name") or "stage" in data:  # "" = a caller's own make_iterator
        return []
    from pretzel_jax.data.pipeline import DATASETS  # train/ imports no data code eagerly

    if data.name in DATASETS:
        return []
    guess = difflib.get_close_matches(str(data.name), list(DATASETS), n=1)
    fix = f"did you mean {guess[0]!r}?" if guess else f"known: {', '.join(sorted(DATASETS))}"
    return [f"data.name={data.name!r} is not a known data set; {fix}"]


def saved_config(values: dict) -> ConfigDict:
    """A run folder's config.json (as a dict) as a ConfigDict, with the keys added to
    default_config() since it was written filled in at their defaults, so the runs of an older
    version still load (its unknown keys still fail `validate`)."""
    config = ConfigDict(values)

    def fill(node: ConfigDict, reference: ConfigDict) -> None:
        for key, value in reference.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, ConfigDict) and isinstance(node[key], ConfigDict):
                fill(node[key], value)

    fill(config, _reference_config(config))
    return config


def _reference_config(config: ConfigDict) -> ConfigDict:
    """default_config(), with the curriculum stage pipeline's data keys when config.data names a
    `stage` (`pretzel_jax.data.stage_config`: packed multimodal sequences)."""
    reference = default_config()
    data = config.get("data")
    if isinstance(data, ConfigDict) and "stage" in data:
        from pretzel_jax.data.pipeline import stage_config  # train/ imports no data code eagerly

        try:
            stage_data = stage_config(data.stage)
        except ValueError as e:
            raise ConfigError(_report([str(e)])) from None
        reference.unlock()
        reference.data = stage_data
    return reference


def _report(problems: list[str]) -> str:
    return "invalid config:\n  " + "\n  ".join(problems)


def _key_problems(config: ConfigDict, reference: ConfigDict, prefix: str = "") -> list[str]:
    problems = []
    for key in config:
        if key not in reference:
            problems.append(_unknown_key(prefix + key, list(reference.keys())))
        elif isinstance(reference[key], ConfigDict):
            if not isinstance(config[key], ConfigDict):
                problems.append(f"{prefix}{key} must be a config section, not {config[key]!r}")
            else:
                problems += _key_problems(config[key], reference[key], f"{prefix}{key}.")
    problems += [
        f"{prefix}{key} is missing; start the experiment from default_config()"
        for key in reference
        if key not in config
    ]
    return problems


def _mesh_problems(config: ConfigDict, device_count: int, process_count: int) -> list[str]:
    try:
        sizes = mesh_shape(config.mesh, device_count)
    except ConfigError as e:
        return [str(e)]
    problems = []
    rules = {}
    for rule in config.mesh.rules:
        if len(rule) != 2:
            problems.append(f"mesh.rules entry {rule!r} must be (logical_name, mesh_axes)")
            continue
        name, target = rule
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            problems.append(f"mesh.rules[{name!r}] uses unknown mesh axes {bad}; use {MESH_AXES}")
        rules[name] = axes
    if "batch" not in rules:
        problems.append("mesh.rules has no 'batch' entry; add ('batch', ('data', 'fsdp'))")
        return problems
    shards = math.prod(sizes.get(a, 1) for a in rules["batch"])
    for key in ("batch_size", "eval_batch_size"):
        size = config.data[key]
        if size <= 0 or size % shards or size % process_count:
            problems.append(
                f"data.{key}={size} must be a positive multiple of the batch shards "
                f"({'*'.join(rules['batch']) or '1'} = {shards}) and of the process count "
                f"({process_count}); change data.{key} or the mesh"
            )
    k = config.train.microbatches
    if k >= 1 and config.data.batch_size % (k * shards):
        problems.append(
            f"train.microbatches={k}: data.batch_size={config.data.batch_size} must be a "
            f"multiple of microbatches * batch shards ({k} * {shards}); change either"
        )
    return problems


def _optim_problems(optim: ConfigDict, steps: int) -> list[str]:
    problems = []
    if optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule={optim.schedule!r} is unknown; use one of {SCHEDULES}")
    if optim.lr <= 0:
        problems.append(f"optim.lr={optim.lr} must be > 0")
    if not 0 <= optim.min_lr <= optim.lr:
        problems.append(f"optim.min_lr={optim.min_lr} must be in [0, optim.lr={optim.lr}]")
    # The cosine part needs at least one step after the warm-up.
    limit = steps - 1 if optim.schedule == "cosine" else steps
    if not 0 <= optim.warmup_steps <= limit:
        problems.append(
            f"optim.warmup_steps={optim.warmup_steps} must be in [0, {limit}] for "
            f"train.steps={steps} and schedule {optim.schedule!r}; lower it or raise train.steps"
        )
    for key in ("b1", "b2"):
        if not 0 <= optim[key] < 1:
            problems.append(f"optim.{key}={optim[key]} must be in [0, 1)")
    for key in ("eps", "weight_decay", "grad_clip"):
        if optim[key] < 0:
            problems.append(f"optim.{key}={optim[key]} must be >= 0")
    for key in ("freeze", "no_decay"):
        patterns = optim[key]
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            problems.append(f"optim.{key} must be a list of regex strings, got {patterns!r}")
            continue
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"optim.{key} pattern {pattern!r} is not a valid regex ({e})")
    return problems


def _train_problems(train: ConfigDict) -> list[str]:
    minimum = {
        "steps": 1,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 1,
        "ckpt_every": 0,
        "keep_checkpoints": 1,
        "max_consecutive_nonfinite": 1,
        "microbatches": 1,
    }
    problems = [
        f"train.{key}={train[key]} must be >= {low}"
        for key, low in minimum.items()
        if train[key] < low
    ]
    if train.progress_bar not in PROGRESS_BAR:
        problems.append(f"train.progress_bar={train.progress_bar!r}: use one of {PROGRESS_BAR}")
    return problems
