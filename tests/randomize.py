"""Shared test helper: perturb every parameter of a module (zero-initialised flow heads would
make most flow tests trivial)."""

import jax
from flax import nnx


def randomized(module, seed, std=0.1):
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [v + std * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
