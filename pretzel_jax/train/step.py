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


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> Batch:
    """Global arrays from this process's rows, sharded on the `batch` logical axis."""
    processes = jax.process_count()

    def place(local: np.ndarray) -> jax.Array:
        local = np.asarray(local)
        shape = (local.shape[0] * processes, *local.shape[1:])
        spec = logical_to_spec(("batch",) + (None,) * (local.ndim - 1), rules, shape, mesh)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, shape)

    return {name: place(value) for name, value in batch.items()}


def _model_loss(setup: TrainSetup, params, rest: Fixed, batch: Batch, key: jax.Array):
    model = model_from(setup, params, rest)
    with sharding_context(setup.mesh, setup.rules):
        loss, metrics = model.loss(batch, key)
    clash = set(metrics) & set(STEP_METRICS)
    if clash:
        raise ValueError(f"model metrics {sorted(clash)} clash with train-step metric names")
    return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in metrics.items()}


def make_train_step(setup: TrainSetup) -> TrainStep:
    """`(state, batch, rest) -> (state, metrics)`, jitted with the state donated."""
    tx = setup.tx

    def step(state: TrainState, batch: Batch, rest: Fixed) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        trainable = state.params

        def loss_fn(trainable):
            return _model_loss(setup, trainable, rest, batch, key)

        (loss, model_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
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
