"""FLOPs of a step, counted from its program before XLA sees it.

`cost_analysis()` of a compiled program counts a `lax.scan` body once, so a model whose layers are
scanned reports a fraction of its work. This counts the step's jaxpr instead: 2 * m * n * k per
matmul (`dot_general`), 2 * outputs * kernel-size * in-features-per-group per convolution, and
(as XLA counts them) one FLOP per output element of elementwise arithmetic and per input element
of a reduction; each scan body times its length, the larger branch of a `cond`, a Pallas
kernel's body times its grid and a `while_loop` body once (its trip count is not static:
`Flops.while_loops` counts them, so a caller can say the figure is a floor). Remat recomputation
is in the jaxpr of a differentiated step, so the count is the hardware's work; count the same
step built with remat off for the model FLOPs of an MFU figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from jax.extend import core

# Elementwise primitives XLA counts as one FLOP per output element (its transcendentals, exp,
# log, tanh, ..., are counted apart and not here).
_ELEMENTWISE = frozenset(
    [
        *("add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign"),
        *("clamp", "is_finite"),
        *("floor", "ceil", "round", "select_n", "eq", "ne", "lt", "le", "gt", "ge"),
        *("and", "or", "not", "xor", "shift_left", "shift_right_logical"),
        *("shift_right_arithmetic", "integer_pow", "square", "convert_element_type"),
        "nextafter",
    ]
)
_REDUCTIONS = frozenset(
    ["reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"]
    + ["argmax", "argmin"]
)
# Cumulative ops lower to a reduce-window as long as the axis: outputs x that length.
_CUMULATIVE = frozenset(["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"])


@dataclasses.dataclass(frozen=True)
class Flops:
    matmul: float = 0.0  # dot_general + convolution (one multiply-add = 2)
    elementwise: float = 0.0
    while_loops: int = 0  # while-loop bodies counted once (their trip counts are not static)

    @property
    def total(self) -> float:
        return self.matmul + self.elementwise

    def __add__(self, other: Flops) -> Flops:
        return Flops(
            self.matmul + other.matmul,
            self.elementwise + other.elementwise,
            self.while_loops + other.while_loops,
        )

    def __mul__(self, k: float) -> Flops:
        return Flops(self.matmul * k, self.elementwise * k, self.while_loops)


def count(fn: Callable, *args, **kwargs) -> Flops:
    """The FLOPs of `fn(*args, **kwargs)`; args may be `jax.ShapeDtypeStruct`s (nothing runs)."""
    return _jaxpr(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _jaxpr(jaxpr: core.Jaxpr) -> Flops:
    return sum((_eqn(eqn) for eqn in jaxpr.eqns), Flops())


def _size(var) -> int:
    return math.prod(getattr(var.aval, "shape", ()))


def _eqn(eqn) -> Flops:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return Flops(matmul=2.0 * _size(eqn.outvars[0]) * math.prod(lhs[d] for d in contract))
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        return Flops(matmul=2.0 * _size(eqn.outvars[0]) * per_output)
    if name in _ELEMENTWISE:
        return Flops(elementwise=float(_size(eqn.outvars[0])))
    if name in _REDUCTIONS:
        return Flops(elementwise=float(_size(eqn.invars[0])))
    if name in _CUMULATIVE:
        length = eqn.invars[0].aval.shape[eqn.params["axis"]]
        return Flops(elementwise=float(_size(eqn.outvars[0]) * length))
    subs = [_jaxpr(getattr(j, "jaxpr", j)) for j in core.jaxprs_in_params(eqn.params)]
    if name == "scan":
        return subs[0] * eqn.params["length"]
    if name == "cond":
        return max(subs, key=lambda f: f.total)
    if name == "while":
        return sum(subs, Flops(while_loops=1))
    if name == "pallas_call":
        return sum(subs, Flops()) * math.prod(eqn.params["grid_mapping"].grid)
    return sum(subs, Flops())
