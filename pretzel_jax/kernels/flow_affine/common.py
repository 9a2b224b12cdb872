"""Kernel plumbing shared by the TPU (Mosaic) and GPU (Triton) bodies: config, pallas_call,
tile math (clip, split, scale, and its backward), reductions, padding, the sampling body.

Grids are (B, cdiv(N, block_n)) for the training direction; `rows` says which rows of an N-block
lie inside the sequence (the tail block is partial on both backends).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pretzel_jax.kernels.flow_affine import reference

SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None


@dataclasses.dataclass(frozen=True)
class KernelCfg:
    """Static configuration of one kernel call (production fields only)."""

    soft_clip: float
    use_softplus: bool
    block_n: int | None
    interpret: bool
    per_position: bool = False  # reductions per position (B, N) instead of per row (B,)


def pallas_call(
    kernel,
    *,
    name,
    grid,
    in_specs,
    out_specs,
    out_shape,
    interpret,
    compiler_params,
    cost,
    args,
    aliases=None,
):
    """pl.pallas_call(...)(*args); a backend module supplies its compiler params."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases or {},
        interpret=interpret,
        name=name,
        compiler_params=compiler_params,
        cost_estimate=cost,
    )(*args)


def row_spec(block_n: int, width: int) -> pl.BlockSpec:
    """(B, N, width) arrays: one example's N-block."""
    return pl.BlockSpec((SQUEEZED, block_n, width), lambda i, j: (i, j, 0))


def full_spec(shape) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda i, j: (0, 0))


def rows(block_n: int, width: int, n: int) -> jax.Array:
    """(block_n, width) bool: which rows of this N-block are inside the sequence."""
    row = jax.lax.broadcasted_iota(jnp.int32, (block_n, width), 0)
    return pl.program_id(1) * block_n + row < n


def pad_cols(v: jax.Array, dp: int) -> jax.Array:
    d = v.shape[-1]
    return v if d == dp else jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, dp - d)])


def column(v: jax.Array | None) -> jax.Array | None:
    """(B, N) -> (B, N, 1) fp32: a per-position input (mask, per-position cotangent) as a tile."""
    return None if v is None else v.astype(jnp.float32)[..., None]


def affine_tile(oa, om, x, cfg: KernelCfg):
    """Clip, split, scale: (a, sigma, log_sigma, z, clip-derivative factors)."""
    if cfg.soft_clip > 0:
        c = cfg.soft_clip
        ta, tm = jnp.tanh(oa / c), jnp.tanh(om / c)
        a, mu = c * ta, c * tm
        da, dm = 1.0 - ta * ta, 1.0 - tm * tm
    else:
        a, mu, da, dm = oa, om, None, None
    sigma, log_sigma = reference.sigma_and_log(a, cfg.use_softplus)
    z = (x.astype(jnp.float32) - mu) / sigma
    return a, sigma, log_sigma, z, da, dm


def tile_grads(a, sigma, z, da, dm, gz, gsls, gsz2, use_softplus: bool):
    """(gx, ga, gmu) from the cotangents of z and of the (already masked) log sigma / z^2 terms.

    gsls, gsz2 broadcast against the (block_n, Dp) tile: (1, Dp) per row, (block_n, 1) per
    position or masked.
    """
    inv = 1.0 / sigma
    gx = (gz + 2.0 * z * gsz2) * inv  # d/dx of z and of sum z^2
    gsig = gsls * inv - gx * z
    if use_softplus:
        ga = gsig * jax.nn.sigmoid(a + reference.SOFTPLUS_ONE)  # d softplus(a + k) / da
    else:
        ga = gsig * sigma  # d exp(a) / da
    gmu = -gx
    if da is not None:
        ga, gmu = ga * da, gmu * dm
    return gx, ga, gmu


def reduce_tile(v, valid, cfg: KernelCfg, d: int):
    """Sum of one per-element term over the tile: per row, a (1, Dp) row of column sums over the
    valid rows; per position, a (block_n, 1) column of sums over the first d (unpadded) columns.
    """
    if not cfg.per_position:
        return jnp.sum(jnp.where(valid, v, 0.0), axis=0, keepdims=True)
    if v.shape[1] != d:  # Triton's padded columns: log sigma there is 0 only up to rounding
        col = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
        v = jnp.where(col < d, v, 0.0)
    return jnp.sum(v, axis=1, keepdims=True)


def sum_parts(part: jax.Array, d: int, cfg: KernelCfg) -> jax.Array:
    """Forward reductions from the kernel's outputs: per row, the (B, nb, 1, Dp) per-program
    column sums added up over the unpadded columns; per position, (B, N, 1) -> (B, N)."""
    if cfg.per_position:
        return part[..., 0]
    # Padded columns have z = 0 and log sigma = 0 up to rounding: drop them before summing.
    return jnp.sum(part[..., :d], (1, 2, 3))


def sample_kernel(ac_ref, au_ref, mc_ref, mu_ref, z_ref, w_ref, x_ref, me_ref, se_ref, *, soft):
    f = lambda r: r[...].astype(jnp.float32)
    x, mu_eff, sigma_eff = reference.guided_math(
        f(ac_ref), f(au_ref), f(mc_ref), f(mu_ref), f(z_ref), f(w_ref), soft
    )
    x_ref[...], me_ref[...], se_ref[...] = x, mu_eff, sigma_eff


# -- operand layout of the training-direction kernels (the same on both backends) ---------------


def _reduction_out(cfg: KernelCfg, bsz: int, n: int, nb: int, block_n: int, dp: int):
    """(BlockSpec, shape) of each forward reduction output: per row, one (1, Dp) row of column
    sums per program, (B, nb, 1, Dp); per position, (B, N, 1)."""
    if cfg.per_position:
        return row_spec(block_n, 1), jax.ShapeDtypeStruct((bsz, n, 1), jnp.float32)
    spec = pl.BlockSpec((SQUEEZED, SQUEEZED, 1, dp), lambda i, j: (i, j, 0, 0))
    return spec, jax.ShapeDtypeStruct((bsz, nb, 1, dp), jnp.float32)


def forward(kernel, h, wa, wmu, ba, bmu, x, mask, *, cfg, block_n, dp, interpret, params, call):
    """Run a forward kernel body: (z (B, N, D), sum_log_sigma, sum_z2).

    kernel(h, wa, wmu, ba, bmu, x, [mask], z, sls, sz2) refs: x, W and b padded to dp columns,
    mask (when given) a (block_n, 1) column.
    """
    bsz, n, c = h.shape
    d = x.shape[-1]
    nb = pl.cdiv(n, block_n)
    wa, wmu, x = pad_cols(wa, dp), pad_cols(wmu, dp), pad_cols(x, dp)
    ba, bmu = pad_cols(ba.reshape(1, d), dp), pad_cols(bmu.reshape(1, d), dp)
    row = lambda width: row_spec(block_n, width)
    args = [h, wa, wmu, ba, bmu, x]
    in_specs = [row(c), full_spec((c, dp)), full_spec((c, dp)), full_spec((1, dp)),
                full_spec((1, dp)), row(dp)]  # fmt: skip
    if mask is not None:
        args.append(column(mask))
        in_specs.append(row(1))
    red_spec, red_shape = _reduction_out(cfg, bsz, n, nb, block_n, dp)
    rows_ = bsz * n
    cost = pl.CostEstimate(
        flops=int(4 * rows_ * c * dp + 12 * rows_ * dp),
        transcendentals=int(4 * rows_ * dp),
        bytes_accessed=int(
            h.size * h.dtype.itemsize
            + 2 * wa.size * wa.dtype.itemsize
            + x.size * x.dtype.itemsize
            + rows_ * dp * 4
        ),
    )
    z, sls, sz2 = call(
        kernel,
        name="flow_affine_fwd",
        grid=(bsz, nb),
        in_specs=in_specs,
        out_specs=[row(dp), red_spec, red_spec],
        out_shape=[jax.ShapeDtypeStruct((bsz, n, dp), jnp.float32), red_shape, red_shape],
        interpret=interpret,
        compiler_params=params,
        cost=cost,
        args=tuple(args),
    )
    return z[..., :d], sum_parts(sls, d, cfg), sum_parts(sz2, d, cfg)


def backward_inputs(h, wa, wmu, ba, bmu, x, mask, gz, gsls, gsz2, *, cfg, block_n, dp):
    """(args, in_specs) of a backward kernel: h, W and b halves, x, [mask], gz, and the sums'
    cotangents: per row broadcast to a (1, Dp) row per example, per position (block_n, 1)."""
    bsz, _, c = h.shape
    d = x.shape[-1]
    row = lambda width: row_spec(block_n, width)
    args = [
        h,
        pad_cols(wa, dp),
        pad_cols(wmu, dp),
        pad_cols(ba.reshape(1, d), dp),
        pad_cols(bmu.reshape(1, d), dp),
        pad_cols(x, dp),
    ]
    in_specs = [row(c), full_spec((c, dp)), full_spec((c, dp)), full_spec((1, dp)),
                full_spec((1, dp)), row(dp)]  # fmt: skip
    if mask is not None:
        args.append(column(mask))
        in_specs.append(row(1))
    args.append(pad_cols(gz.astype(jnp.float32), dp))
    in_specs.append(row(dp))
    if cfg.per_position:
        args += [column(gsls), column(gsz2)]
        in_specs += [row(1), row(1)]
    else:
        per_example = pl.BlockSpec((SQUEEZED, 1, dp), lambda i, j: (i, 0, 0))
        args += [jnp.broadcast_to(g.astype(jnp.float32)[:, None, None], (bsz, 1, dp))
                 for g in (gsls, gsz2)]  # fmt: skip
        in_specs += [per_example, per_example]
    return tuple(args), in_specs


def backward_cost(h, wa, x, dp: int, *, matmul_flops: int, extra_bytes: int) -> pl.CostEstimate:
    rows_, c = h.shape[0] * h.shape[1], h.shape[2]
    return pl.CostEstimate(
        flops=int(matmul_flops * rows_ * c * dp + 40 * rows_ * dp),
        transcendentals=int(6 * rows_ * dp),
        bytes_accessed=int(
            2 * h.size * h.dtype.itemsize
            + 2 * c * dp * wa.dtype.itemsize
            + 3 * rows_ * dp * x.dtype.itemsize
            + extra_bytes
        ),
    )


def cast_grads(gh, gwa, gwmu, gba, gbmu, gx, wa, wmu, ba, bmu, d: int):
    """Backward outputs in the primal dtypes and shapes, padded columns dropped."""
    return (
        gh,
        gwa.astype(wa.dtype),
        gwmu.astype(wmu.dtype),
        gba.reshape(ba.shape).astype(ba.dtype),
        gbmu.reshape(bmu.shape).astype(bmu.dtype),
        gx[..., :d],
    )


def sample_cost(rows_: int, dp: int) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=int(20 * rows_ * dp),
        transcendentals=int(6 * rows_ * dp),
        bytes_accessed=int(8 * rows_ * dp * 4),
    )
