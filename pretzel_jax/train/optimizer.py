"""AdamW with an LR schedule, and the per-parameter policy (frozen? weight decay?) from regexes.

Params are a nested dict (`nnx.State.to_pure_dict()`); a parameter's path is its keys joined by
"/" ("flow/blocks/0/attn/q/kernel"). `optim.freeze` and `optim.no_decay` are regexes searched in
these paths, and each must match at least one parameter, so a typo'd pattern fails loudly.

Frozen parameters are split off before differentiation: the optimizer only ever sees the
trainable subtree, so frozen weights get no gradient buffers and no Adam moments (this matters
for a frozen multi-billion-parameter VLM) and stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from ml_collections import ConfigDict

from pretzel_jax.train.errors import ConfigError

Params = dict[str, Any]  # nested dict of arrays (or ShapeDtypeStructs)


def _flat(params: Params | nnx.State) -> dict[tuple, Any]:
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    return flatten_dict(params)


def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class ParamPolicy:
    """Which parameter paths are trained and which of those get weight decay."""

    trainable: frozenset[str]
    decay: frozenset[str]

    def split(self, params: Params) -> tuple[Params, Params]:
        """(trainable, frozen) nested dicts."""
        flat = flatten_dict(params)
        train = {k: v for k, v in flat.items() if path_str(k) in self.trainable}
        frozen = {k: v for k, v in flat.items() if path_str(k) not in self.trainable}
        return unflatten_dict(train), unflatten_dict(frozen)

    def merge(self, trainable: Params, frozen: Params) -> Params:
        return unflatten_dict({**flatten_dict(trainable), **flatten_dict(frozen)})

    def decay_mask(self, trainable: Params) -> Params:
        """Bool tree over the trainable params: True where weight decay applies."""
        flat = flatten_dict(trainable)
        return unflatten_dict({k: path_str(k) in self.decay for k in flat})


def _compile(patterns: Sequence[str], key: str, paths: Sequence[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{key} pattern {pattern!r} is not a valid regex ({e})") from e
        if not any(regex.search(p) for p in paths):
            raise ConfigError(
                f"{key} pattern {pattern!r} matches no parameter; fix or remove it (parameter "
                f"paths look like {paths[0]!r}; see describe_param_policy)"
            )
        compiled.append(regex)
    return compiled


def param_policy(params: Params | nnx.State, optim_cfg: ConfigDict) -> ParamPolicy:
    """Classify every parameter path by `optim.freeze` and `optim.no_decay`."""
    paths = [path_str(k) for k in _flat(params)]
    if not paths:
        raise ConfigError("the model has no nnx.Param parameters to train")
    freeze = _compile(optim_cfg.freeze, "optim.freeze", paths)
    no_decay = _compile(optim_cfg.no_decay, "optim.no_decay", paths)
    trainable = frozenset(p for p in paths if not any(r.search(p) for r in freeze))
    if not trainable:
        raise ConfigError(f"optim.freeze={tuple(optim_cfg.freeze)} freezes every parameter")
    decay = frozenset(p for p in trainable if not any(r.search(p) for r in no_decay))
    return ParamPolicy(trainable=trainable, decay=decay)


def describe_param_policy(params: Params | nnx.State, optim_cfg: ConfigDict) -> str:
    """A table of every parameter: path, shape, dtype, trainable, weight decay; then totals."""
    policy = param_policy(params, optim_cfg)
    flat = {path_str(k): v for k, v in _flat(params).items()}
    width = max(len(p) for p in flat)
    header = f"{'path':<{width}}  {'shape':<18} {'dtype':<9} trainable  decay"
    rows = [header, "-" * len(header)]
    counts = {True: 0, False: 0}
    for path, value in flat.items():
        train = path in policy.trainable
        counts[train] += int(np.prod(value.shape))
        rows.append(
            f"{path:<{width}}  {str(tuple(value.shape)):<18} {str(value.dtype):<9} "
            f"{'yes' if train else 'no':<10} {'yes' if path in policy.decay else 'no'}"
        )
    rows.append(f"trainable params: {counts[True]:,}; frozen params: {counts[False]:,}")
    return "\n".join(rows)


def make_schedule(optim_cfg: ConfigDict, steps: int) -> optax.Schedule:
    """Linear warm-up from min_lr to lr, then cosine to min_lr at `steps` (or constant)."""
    lr, low, warmup = optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(low, lr, warmup, steps, end_value=low)
    if optim_cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(low, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    raise ConfigError(f"optim.schedule={optim_cfg.schedule!r} is unknown; use cosine or constant")


def make_optimizer(
    optim_cfg: ConfigDict, steps: int, decay_mask: Mapping[str, Any]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping when grad_clip > 0) over the trainable params, whose
    structure `decay_mask` gives."""
    schedule = make_schedule(optim_cfg, steps)
    adamw = optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=decay_mask,
    )
    # identity() when off keeps the optimizer-state structure (and so checkpoints) the same.
    clip = optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else None
    return optax.chain(clip or optax.identity(), adamw), schedule
