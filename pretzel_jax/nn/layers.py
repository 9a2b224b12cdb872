"""Dense projections, norms and MLPs with logical axis names on every parameter.

Parameters are stored in `param_dtype`; matmuls run in `compute_dtype` (bf16 on TPU/GPU, fp32 in
CPU tests); norms are computed in fp32 and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.nn.sharding import param

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
default_kernel_init: Initializer = nnx.initializers.lecun_normal()


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis; `axes` names (in, out)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
    ):
        shape = (in_features, out_features)
        self.kernel = param(kernel_init(rngs.params(), shape, param_dtype), axes)
        self.bias = (
            param(bias_init(rngs.params(), (out_features,), param_dtype), (axes[1],))
            if use_bias
            else None
        )
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class LayerNorm(nnx.Module):
    def __init__(
        self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, axis_name: str = "embed"
    ):
        self.scale = param(jnp.ones((dim,), jnp.float32), (axis_name,))
        self.bias = param(jnp.zeros((dim,), jnp.float32), (axis_name,)) if use_bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            h = h + self.bias[...]
        return h.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm; with `unit_offset` the weight starts at 0 and multiplies by (1 + w) (STARFlow's
    final norm and Gemma-style checkpoints), otherwise it starts at 1 (Qwen/Llama)."""

    def __init__(
        self, dim: int, *, eps: float = 1e-6, unit_offset: bool = False, axis_name: str = "embed"
    ):
        init = jnp.zeros if unit_offset else jnp.ones
        self.scale = param(init((dim,), jnp.float32), (axis_name,))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        w = self.scale[...]
        return (h * (1.0 + w if self.unit_offset else w)).astype(x.dtype)


def make_norm(kind: str, dim: int, **kw) -> LayerNorm | RMSNorm:
    if kind == "layer_norm":
        return LayerNorm(dim, **kw)
    if kind == "rms_norm":
        return RMSNorm(dim, **kw)
    if kind == "rms_norm_unit":  # weight stored as w, applied as (1 + w): STARFlow, Gemma
        return RMSNorm(dim, unit_offset=True, **kw)
    raise ValueError(f"unknown norm {kind!r}; use 'layer_norm', 'rms_norm' or 'rms_norm_unit'")


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it, x/2 (1 + erf(x/sqrt 2)). `jax.nn.gelu(approximate=False)`
    goes through erfc, whose range selects made it 2.3x slower forward and 2x with its gradient
    on the 2-core CPU (16x192x512 fp32); the two differ by fp32 rounding (1e-6 abs)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


class MLP(nnx.Module):
    """Transformer feed-forward: 'gelu' (exact erf GELU, TarFlow/STARFlow) or 'gelu_tanh' or
    'swiglu' (silu(gate) * up, Qwen/Llama)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        kind: str = "gelu",
        use_bias: bool = True,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype = jnp.float32,
        compute_dtype: jnp.dtype = jnp.float32,
    ):
        if kind not in ("gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"unknown MLP kind {kind!r}; use 'gelu', 'gelu_tanh' or 'swiglu'")
        kw = dict(
            rngs=rngs, use_bias=use_bias, param_dtype=param_dtype, compute_dtype=compute_dtype
        )
        self.kind = kind
        self.up = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.gate = Dense(dim, hidden, axes=("embed", "mlp"), **kw) if kind == "swiglu" else None
        self.down = Dense(hidden, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = self.up(x)
            h = jax.nn.gelu(h, approximate=True) if self.kind == "gelu_tanh" else gelu(h)
        return self.down(h)
