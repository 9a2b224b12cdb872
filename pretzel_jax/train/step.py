"""The jitted, sharded train and eval steps, and batch placement.

The model is merged from the trainable params and `rest` (a `Fixed`: the frozen params and the
non-Param model state) inside the step (`nnx.merge`), so the step is a pure function of
(state, batch, rest); only the trainable params are differentiated. A step whose loss or
gradient norm is not finite leaves params and optimizer state untouched and is counted; the host
loop decides when to give up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from pretzel_jax.nn.sharding import Rules, logical_to_spec, sharding_context
from pretzel_jax.train.state import Fixed, TrainSetup, TrainState, model_from

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Batch, Fixed], tuple[TrainState, Metrics]]
EvalStep = Callable[[dict, Batch, Fixed, jax.Array], Metrics]

# Metrics the train step adds; a model metric may not reuse these names.
STEP_METRICS = ("loss", "grad_norm", "lr", "skipped", "nonfinite_consecutive", "nonfinite_total")


def batch_sharding(shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> NamedSharding:
    """How a global batch array of `shape` is placed: its first dim on the `batch` axis."""
    spec = logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules, shape, mesh)
    return NamedSharding(mesh, spec)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> Batch:
    """Global arrays from this process's rows, sharded on the `batch` logical axis."""
    processes = jax.process_count()

    def place(local: np.ndarray) -> jax.Array:
        local = np.asarray(local)
        shape = (local.shape[0] * processes, *local.shape[1:])
        sharding = batch_sharding(shape, mesh, rules)
        return jax.make_array_from_process_local_data(sharding, local, shape)

    return {name: place(value) for name, value in batch.items()}


def _model_loss(setup: TrainSetup, params, rest: Fixed, batch: Batch, key: jax.Array):
    model = model_from(setup, params, rest)
    with sharding_context(setup.mesh, setup.rules):
        loss, metrics = model.loss(batch, key)
    clash = set(metrics) & set(STEP_METRICS)
    if clash:
        raise ValueError(f"model metrics {sorted(clash)} clash with train-step metric names")
    return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in metrics.items()}


def _gradients(setup: TrainSetup, trainable, rest: Fixed, batch: Batch, key: jax.Array):
    """(loss, model metrics, gradients) of the batch; with `train.microbatches` = k > 1, the mean
    of k slices' (a `lax.scan`, so activations are those of one slice; slice i draws its
    randomness from fold_in(key, i), and its metrics are averaged, counts included). Slice i
    holds rows i, i + k, ...: each device's rows split evenly, so slicing moves no data."""

    def loss_fn(trainable, batch, key):
        return _model_loss(setup, trainable, rest, batch, key)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = setup.config.train.microbatches
    if k == 1:
        (loss, metrics), grads = grad_fn(trainable, batch, key)
        return loss, metrics, grads

    def split(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        axes = (None, "batch") + (None,) * (x.ndim - 2)
        spec = logical_to_spec(axes, setup.rules, x.shape, setup.mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(setup.mesh, spec))

    def body(total, i_slice):
        i, piece = i_slice
        (loss, metrics), grads = grad_fn(trainable, piece, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

    slices = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], slices)
    shapes = jax.eval_shape(lambda: grad_fn(trainable, first, key))
    (loss_shape, metric_shapes), grad_shapes = shapes
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, metric_shapes, grad_shapes)
    )
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), slices))
    return jax.tree.map(lambda t: t / k, total)


def make_train_step(setup: TrainSetup) -> TrainStep:
    """`(state, batch, rest) -> (state, metrics)`, jitted with the state donated."""
    tx = setup.tx

    def step(state: TrainState, batch: Batch, rest: Fixed) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        trainable = state.params
        loss, model_metrics, grads = _gradients(setup, trainable, rest, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = (~finite).astype(jnp.int32)
        consecutive = jnp.where(finite, 0, state.nonfinite_consecutive + 1)
        total = state.nonfinite_total + skipped
        # The schedule advances only on applied updates (optax counts inside opt_state).
        lr = setup.schedule(state.step - state.nonfinite_total)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(new_trainable, trainable),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            nonfinite_consecutive=consecutive,
            nonfinite_total=total,
        )
        metrics = {
            "loss": loss,
            **model_metrics,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            "skipped": skipped,
            "nonfinite_consecutive": consecutive,
            "nonfinite_total": total,
        }
        return new_state, metrics

    return jax.jit(step, out_shardings=(setup.shardings, setup.replicated), donate_argnums=0)


def make_eval_step(setup: TrainSetup) -> EvalStep:
    """`(params, batch, rest, key) -> {"loss", **model metrics}` (no gradients); `params` are
    the trainable ones (`TrainState.params`)."""

    def step(params, batch: Batch, rest: Fixed, key: jax.Array) -> Metrics:
        loss, metrics = _model_loss(setup, params, rest, batch, key)
        return {"loss": loss, **metrics}

    return jax.jit(step, out_shardings=setup.replicated)
