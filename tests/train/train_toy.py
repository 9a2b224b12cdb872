"""A toy model, data and config for the train/ tests (8 fake CPU devices)."""

from __future__ import annotations

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from pretzel_jax.nn.sharding import param
from pretzel_jax.train.config import apply_overrides, default_config

DIM = 8


class Dense(nnx.Module):
    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, rngs: nnx.Rngs):
        self.kernel = param(jax.random.normal(rngs.params(), (din, dout)) / din**0.5, axes)
        self.bias = param(jnp.zeros((dout,)), axes[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class ToyRegressor(nnx.Module):
    """A 2-layer MLP regressing y from noisy x; params carry logical axis names."""

    def __init__(self, hidden: int = 16, *, rngs: nnx.Rngs):
        self.dense1 = Dense(DIM, hidden, ("embed", "mlp"), rngs=rngs)
        self.dense2 = Dense(hidden, DIM, ("mlp", "embed"), rngs=rngs)
        self.scale = param(jnp.ones((DIM,)), ("embed",))

    def loss(self, batch, key):
        x = batch["x"] + 0.01 * jax.random.normal(key, batch["x"].shape)
        pred = self.dense2(jnp.tanh(self.dense1(x))) * self.scale[...]
        err = jnp.mean(jnp.square(pred - batch["y"]))
        metrics = {"bits_per_dim": err / jnp.log(2.0), "logdet": jnp.mean(jnp.log(self.scale[...]))}
        return err, metrics


def build_toy(config: ConfigDict, *, rngs: nnx.Rngs, hidden: int = 16) -> ToyRegressor:
    return ToyRegressor(hidden, rngs=rngs)


def toy_config(*overrides: str) -> ConfigDict:
    config = default_config()
    apply_overrides(
        config,
        [
            "mesh.data=2",
            "mesh.fsdp=4",
            "optim.lr=0.01",
            "optim.warmup_steps=2",
            "train.steps=12",
            "train.log_every=1",
            "train.ckpt_every=4",
            "train.progress_bar=off",
            "data.batch_size=16",
            "data.eval_batch_size=16",
            *overrides,
        ],
    )
    return config


def toy_records(
    n: int = 200, seed: int = 0, nan: bool = False, nan_from: int | None = None
) -> list[dict[str, np.ndarray]]:
    """`nan`: every x is NaN; `nan_from`: records from this index on."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = np.sin(2 * x).astype(np.float32)
    if nan:
        x[:] = np.nan
    if nan_from is not None:
        x[nan_from:] = np.nan
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def toy_batch(rows: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    records = toy_records(rows, seed)
    return {k: np.stack([r[k] for r in records]) for k in ("x", "y")}


class _SigtermAt:
    """A Grain map that sends this process SIGTERM when it reads its `at`-th record."""

    def __init__(self, at: int):
        self.at, self.seen = at, 0

    def __call__(self, record):
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return record


def toy_iterator_factory(records, sigterm_at: int | None = None):
    """A `pretzel_jax.data.make_iterator` stand-in over `records` (checkpointable, in-thread)."""

    def make_iterator(
        data_cfg, split, *, process_index, process_count, shuffle=None, num_epochs=None
    ):
        ds = grain.MapDataset.source(records)
        if shuffle is None:
            shuffle = data_cfg.shuffle and split == "train"
        if shuffle:
            ds = ds.seed(data_cfg.seed).shuffle()
        ds = ds.repeat(num_epochs)
        if sigterm_at is not None and split == "train":
            ds = ds.map(_SigtermAt(sigterm_at))
        # No read threads: records are read in order in the main thread (deterministic SIGTERM).
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return iter(it.batch(data_cfg.batch_size // process_count, drop_remainder=True))

    return make_iterator
