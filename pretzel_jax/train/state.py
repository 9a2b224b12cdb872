"""The train state and its one abstract, sharded description.

`build_setup` traces the model once with `nnx.eval_shape` (no arrays are allocated), classifies
its parameters, builds the optimizer and derives a `NamedSharding` for every leaf of the train
state from the parameters' logical axis names. The resulting `TrainSetup.abstract` (shape, dtype
and sharding per leaf) is the target of the sharded init, of the Orbax restore and of compilation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from pretzel_jax.nn.sharding import Rules, named_shardings
from pretzel_jax.train.optimizer import ParamPolicy, Params, make_optimizer, param_policy

# `pretzel_jax.models.build`'s signature: build(config, rngs=nnx.Rngs(seed)) -> nnx.Module.
ModelBuilder = Callable[..., nnx.Module]

# Folded into the seed so that step and eval keys differ from the model-init keys.
_STEP_KEY_STREAM = 1
_EVAL_KEY_STREAM = 2


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed so far
    params: Params  # every nnx.Param of the model (nested dict)
    opt_state: optax.OptState  # over the trainable params only
    rng: jax.Array  # uint32 key data; step t uses fold_in(rng, t), so a resume is exact
    nonfinite_consecutive: jax.Array  # int32: skipped (non-finite) steps in a row
    nonfinite_total: jax.Array  # int32: all skipped steps


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static about a run: model structure, optimizer, shardings."""

    config: ConfigDict
    mesh: Mesh
    rules: Rules
    build: Callable[[], nnx.Module]  # builds the model from config (call under jit)
    graphdef: nnx.GraphDef
    policy: ParamPolicy
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: TrainState  # ShapeDtypeStructs carrying their NamedSharding
    shardings: TrainState  # NamedSharding per leaf
    rest_shardings: nnx.State  # non-Param model state (buffers, ...), sharded alike

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(model, nnx.Param, ...)


def build_setup(config: ConfigDict, mesh: Mesh, build_model: ModelBuilder) -> TrainSetup:
    """Trace `build_model(config, rngs=nnx.Rngs(config.seed))` abstractly and derive the
    parameter policy, optimizer, abstract state and shardings (raises ConfigError for a bad
    freeze/no_decay pattern)."""
    rules = tuple(config.mesh.rules)

    def build() -> nnx.Module:
        return build_model(config, rngs=nnx.Rngs(config.seed))

    graphdef, abs_params, abs_rest = _split(nnx.eval_shape(build))
    pure_params = abs_params.to_pure_dict()
    policy = param_policy(pure_params, config.optim)
    trainable, _ = policy.split(pure_params)
    tx, schedule = make_optimizer(config.optim, config.train.steps, policy.decay_mask(trainable))

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = named_shardings(abs_params, mesh, rules).to_pure_dict()
    train_shardings, _ = policy.split(param_shardings)
    abs_opt_state = jax.eval_shape(tx.init, trainable)
    # Optimizer moments mirror their parameter's sharding; counters are replicated.
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abs_opt_state,
        train_shardings,
        transform_non_params=lambda _: replicated,
    )
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        nonfinite_consecutive=replicated,
        nonfinite_total=replicated,
    )
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(lambda: _fresh_state(build, policy, tx, config.seed)),
        shardings,
    )
    return TrainSetup(
        config=config,
        mesh=mesh,
        rules=rules,
        build=build,
        graphdef=graphdef,
        policy=policy,
        tx=tx,
        schedule=schedule,
        abstract=abstract,
        shardings=shardings,
        rest_shardings=named_shardings(abs_rest, mesh, rules),
    )


def _fresh_state(
    build: Callable[[], nnx.Module],
    policy: ParamPolicy,
    tx: optax.GradientTransformation,
    seed: int,
) -> TrainState:
    _, params, _ = _split(build())
    params = params.to_pure_dict()
    trainable, _ = policy.split(params)
    key = jax.random.fold_in(jax.random.key(seed), _STEP_KEY_STREAM)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(key),
        nonfinite_consecutive=zero,
        nonfinite_total=zero,
    )


def init_state(setup: TrainSetup) -> TrainState:
    """A fresh train state, created directly in its shardings (never whole on one device)."""
    fresh = lambda: _fresh_state(setup.build, setup.policy, setup.tx, setup.config.seed)
    return jax.jit(fresh, out_shardings=setup.shardings)()


def init_rest(setup: TrainSetup) -> nnx.State:
    """The model's non-Param state (rebuilt from the seed, not checkpointed). Parameter init
    is dead code here, so XLA drops it."""
    return jax.jit(lambda: _split(setup.build())[2], out_shardings=setup.rest_shardings)()


def eval_key(seed: int) -> jax.Array:
    """The fixed key of every eval batch (so evals at different steps are comparable)."""
    return jax.random.fold_in(jax.random.key(seed), _EVAL_KEY_STREAM)


def model_from(setup: TrainSetup, params: Params, rest: nnx.State) -> nnx.Module:
    return nnx.merge(setup.graphdef, params, rest)
