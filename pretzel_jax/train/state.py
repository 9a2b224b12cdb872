"""The train state, the fixed inputs beside it, and their one abstract, sharded description.

`build_setup` traces the model once with `nnx.eval_shape` (no arrays are allocated), classifies
its parameters, builds the optimizer and derives a `NamedSharding` for every leaf of the train
state from the parameters' logical axis names. The resulting `TrainSetup.abstract` (shape, dtype
and sharding per leaf) is the target of the sharded init, of the Orbax restore and of compilation.

`TrainState` holds what training changes and checkpoints: the trainable parameters and their
optimizer state. The frozen parameters and the model's non-Param state travel beside it as
`Fixed` (the steps' `rest` argument): rebuilt at every start from the seed and the weight
sources (`pretzel_jax.train.weights`), never differentiated, never checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from pretzel_jax.nn.sharding import Rules, named_shardings, undivided
from pretzel_jax.train.errors import ConfigError
from pretzel_jax.train.optimizer import (
    ParamPolicy,
    Params,
    make_optimizer,
    param_policy,
    path_str,
)
from pretzel_jax.train.weights import WeightSource, check_sources, covered_paths, load_sources

# `pretzel_jax.models.build`'s signature: build(config, rngs=nnx.Rngs(seed)) -> nnx.Module.
ModelBuilder = Callable[..., nnx.Module]

# Folded into the seed so that step and eval keys differ from the model-init keys.
_STEP_KEY_STREAM = 1
_EVAL_KEY_STREAM = 2


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed so far
    params: Params  # the trainable nnx.Params of the model (nested dict)
    opt_state: optax.OptState  # over the trainable params only
    rng: jax.Array  # uint32 key data; step t uses fold_in(rng, t), so a resume is exact
    nonfinite_consecutive: jax.Array  # int32: skipped (non-finite) steps in a row
    nonfinite_total: jax.Array  # int32: all skipped steps


@struct.dataclass
class Fixed:
    """The steps' `rest`: model inputs that training does not change and checkpoints omit."""

    frozen: Params  # the frozen nnx.Params (nested dict; empty when nothing is frozen)
    state: nnx.State  # the non-Param model state (buffers, ...)


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
    rest_abstract: Fixed  # frozen params + non-Param state: ShapeDtypeStructs with shardings
    rest_shardings: Fixed  # NamedSharding per leaf of `rest`
    all_params: Params  # every parameter (trainable and frozen), abstract, in model order

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

    limit = config.mesh.replicated_limit_mib
    undivided_params = undivided(abs_params, mesh, rules, int(limit * 2**20))
    if undivided_params:
        raise ConfigError(
            f"{len(undivided_params)} parameter(s) of {limit} MiB or more would be replicated "
            "where their sharding rules ask for mesh axes their sizes do not divide: "
            + "; ".join(undivided_params[:4])
            + ". Change the mesh sizes or config.mesh.rules, or raise "
            "config.mesh.replicated_limit_mib to accept it"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = named_shardings(abs_params, mesh, rules).to_pure_dict()
    train_shardings, frozen_shardings = policy.split(param_shardings)
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
        params=train_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        nonfinite_consecutive=replicated,
        nonfinite_total=replicated,
    )
    fresh = jax.eval_shape(lambda: _fresh_state(build, policy, tx, config.seed))
    abstract = jax.tree.map(_with_sharding, fresh, shardings)
    all_params = jax.tree.map(_with_sharding, pure_params, param_shardings)
    rest_shardings = Fixed(frozen=frozen_shardings, state=named_shardings(abs_rest, mesh, rules))
    rest_abstract = Fixed(
        frozen=policy.split(all_params)[1],
        state=jax.tree.map(_with_sharding, abs_rest, rest_shardings.state),
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
        rest_abstract=rest_abstract,
        rest_shardings=rest_shardings,
        all_params=all_params,
    )


def _with_sharding(leaf, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _fresh_state(
    build: Callable[[], nnx.Module],
    policy: ParamPolicy,
    tx: optax.GradientTransformation,
    seed: int,
) -> TrainState:
    _, params, _ = _split(build())
    trainable, _ = policy.split(params.to_pure_dict())
    key = jax.random.fold_in(jax.random.key(seed), _STEP_KEY_STREAM)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=trainable,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(key),
        nonfinite_consecutive=zero,
        nonfinite_total=zero,
    )


def _without(tree: Params, paths: frozenset[str]) -> Params:
    """`tree` less the leaves at `paths`."""
    flat = flatten_dict(tree)
    return unflatten_dict({k: v for k, v in flat.items() if path_str(k) not in paths})


def _with(tree: Params, loaded: dict[tuple, jax.Array], like: Params) -> Params:
    """`tree` plus the `loaded` leaves, in `like`'s (model) order."""
    flat = {**flatten_dict(tree), **loaded}
    return unflatten_dict({k: flat[k] for k in flatten_dict(like)})


def _sources(setup: TrainSetup, sources: Sequence[WeightSource], role: str) -> list[WeightSource]:
    check_sources(sources, setup.all_params, setup.policy.trainable)
    return [s for s in sources if s.role == role]


def init_state(setup: TrainSetup, sources: Sequence[WeightSource] = ()) -> TrainState:
    """A fresh train state, created directly in its shardings (never whole on one device); the
    trainable parameters under the "init" `sources` are loaded from them (and never randomly
    initialised: the jitted init only outputs the leaves no source covers)."""
    init = _sources(setup, sources, "init")
    skip = covered_paths(init, setup.abstract.params)

    def fresh() -> TrainState:
        state = _fresh_state(setup.build, setup.policy, setup.tx, setup.config.seed)
        return state.replace(params=_without(state.params, skip))

    shardings = setup.shardings.replace(params=_without(setup.shardings.params, skip))
    state = jax.jit(fresh, out_shardings=shardings)()
    if not init:
        return state
    loaded = load_sources(init, setup.abstract.params)
    return state.replace(params=_with(state.params, loaded, setup.abstract.params))


def init_rest(setup: TrainSetup, sources: Sequence[WeightSource] = ()) -> Fixed:
    """The frozen parameters and the non-Param model state (rebuilt from the seed, not
    checkpointed), the frozen parameters under the "frozen" `sources` loaded from them after
    init, each device reading its own slice. The jitted init only outputs the leaves no source
    covers, so XLA drops the random init of the loaded ones (and of every trainable one)."""
    frozen = _sources(setup, sources, "frozen")
    skip = covered_paths(frozen, setup.rest_abstract.frozen)

    def fresh() -> tuple[Params, nnx.State]:
        _, params, state = _split(setup.build())
        _, frozen_params = setup.policy.split(params.to_pure_dict())
        return _without(frozen_params, skip), state

    shardings = (_without(setup.rest_shardings.frozen, skip), setup.rest_shardings.state)
    frozen_params, state = jax.jit(fresh, out_shardings=shardings)()
    if frozen:
        loaded = load_sources(frozen, setup.rest_abstract.frozen)
        frozen_params = _with(frozen_params, loaded, setup.rest_abstract.frozen)
    return Fixed(frozen=frozen_params, state=state)


def eval_key(seed: int) -> jax.Array:
    """The fixed key of every eval batch (so evals at different steps are comparable)."""
    return jax.random.fold_in(jax.random.key(seed), _EVAL_KEY_STREAM)


def model_from(setup: TrainSetup, params: Params, rest: Fixed) -> nnx.Module:
    """The model from the trainable `params` and `rest` (frozen params + non-Param state)."""
    if rest.frozen:
        params = setup.policy.merge(params, rest.frozen)
    return nnx.merge(setup.graphdef, params, rest.state)
