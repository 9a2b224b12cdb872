"""TPU (Mosaic) kernel bodies and builders; in interpret mode (CPU) these bodies run too.

C and D are full-extent block dims (any size) and block_n a multiple of 8. The tail N-block reads
padding and its writes are dropped, so tail rows are masked with `where` before any reduction.
Forward: each program does two (C, D) matmuls (W and b arrive split into their `a` and `mu`
halves, so no lane-slicing at offset D), the clip / split / scale, z, and one (1, D) row of
per-column partial sums per reduction (or, per position, a (block_n, 1) column of sums over D).
Backward: weight and bias grads accumulate over the N-blocks of an example in the resident
output block (N grid axis "arbitrary"), so only (B, C, 2D) partials reach memory and the wrapper
sums over B.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pretzel_jax.kernels.flow_affine import common, support


def _compiler_params(target: str, semantics: tuple[str, ...]):
    if target != "tpu":
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(
        dimension_semantics=semantics, vmem_limit_bytes=support.TPU_VMEM_LIMIT
    )


def _block_n(cfg: common.KernelCfg, n: int) -> int:
    return cfg.block_n or support.default_block_n(n, "interpret" if cfg.interpret else "tpu")


def _store_rows(ref, val):
    """Store a (block_n, width) tile; Mosaic drops the writes of rows past N."""
    ref[...] = val.astype(ref.dtype)


def _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref):
    """fp32 pre-clip head outputs (o_a, o_mu), each (block_n, D), for this tile."""
    cd = jnp.promote_types(h_ref.dtype, wa_ref.dtype)
    dot = lambda p, q: jax.lax.dot(p.astype(cd), q.astype(cd), preferred_element_type=jnp.float32)
    hv = h_ref[...]
    oa, om = dot(hv, wa_ref[...]), dot(hv, wmu_ref[...])
    return oa + ba_ref[...].astype(jnp.float32), om + bmu_ref[...].astype(jnp.float32)


# -- forward ------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg, n, block_n, masked):
    """refs: h, wa, wmu, ba, bmu, x, [mask], then outs z, sls, sz2."""
    h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, x_ref, *refs = refs
    m_ref = refs.pop(0) if masked else None
    z_ref, sls_ref, sz2_ref = refs
    oa, om = _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref)
    d = oa.shape[1]
    valid = common.rows(block_n, d, n)
    _, _, log_sigma, z, _, _ = common.affine_tile(oa, om, x_ref[...], cfg)
    _store_rows(z_ref, z)
    z2 = z * z
    if masked:
        m = m_ref[...]  # (block_n, 1)
        log_sigma, z2 = log_sigma * m, z2 * m
    sls_ref[...] = common.reduce_tile(log_sigma, valid, cfg, d)
    sz2_ref[...] = common.reduce_tile(z2, valid, cfg, d)


def fwd_build(cfg: common.KernelCfg, target: str, call=common.pallas_call):
    """target: "tpu" (compiled) or "interpret". call: the pallas_call runner."""

    def run(h, wa, wmu, ba, bmu, x, mask=None):
        n = h.shape[1]
        block_n = _block_n(cfg, n)
        kernel = functools.partial(
            _fwd_kernel, cfg=cfg, n=n, block_n=block_n, masked=mask is not None
        )
        return common.forward(
            kernel, h, wa, wmu, ba, bmu, x, mask,
            cfg=cfg, block_n=block_n, dp=x.shape[-1], interpret=target == "interpret",
            params=_compiler_params(target, ("parallel", "parallel")), call=call,
        )  # fmt: skip

    return run


# -- backward -----------------------------------------------------------------------------------


def _bwd_kernel(*refs, cfg, n, block_n, masked):
    """refs: h, wa, wmu, ba, bmu, x, [mask], gz, gsls, gsz2, then outs gh, gx, gWa, gWmu, gba,
    gbmu (weight / bias grads accumulated per example)."""
    h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, x_ref, *refs = refs
    m_ref = refs.pop(0) if masked else None
    gz_ref, gsls_ref, gsz2_ref, gh_ref, gx_ref, gwa_ref, gwmu_ref, gba_ref, gbmu_ref = refs
    c, d = wa_ref.shape
    oa, om = _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref)
    valid = common.rows(block_n, d, n)
    x = x_ref[...]
    gz = gz_ref[...].astype(jnp.float32)
    a, sigma, _, z, da, dm = common.affine_tile(oa, om, x, cfg)
    # (1, D): this example's cotangent, broadcast; per position (block_n, 1).
    gsls = gsls_ref[...].astype(jnp.float32)
    gsz2 = gsz2_ref[...].astype(jnp.float32)
    if masked:
        m = m_ref[...]
        gsls, gsz2 = gsls * m, gsz2 * m
    gx, ga, gmu = common.tile_grads(a, sigma, z, da, dm, gz, gsls, gsz2, cfg.use_softplus)
    ga = jnp.where(valid, ga, 0.0)
    gmu = jnp.where(valid, gmu, 0.0)
    _store_rows(gx_ref, gx)

    cd = jnp.promote_types(h_ref.dtype, wa_ref.dtype)
    nt = (((1,), (1,)), ((), ()))  # (block_n, D) x (C, D) -> (block_n, C)
    tn = (((0,), (0,)), ((), ()))  # (block_n, C) x (block_n, D) -> (C, D)
    mm = lambda p, q, dims: jax.lax.dot_general(
        p.astype(cd), q.astype(cd), dims, preferred_element_type=jnp.float32
    )
    ga_c, gmu_c = ga.astype(cd), gmu.astype(cd)

    # Weight / bias grads accumulate over the N-blocks of one example in the resident output
    # block (the N grid axis is sequential, "arbitrary"): (B, C, D) partials only.
    @pl.when(pl.program_id(1) == 0)
    def _init():
        for ref in (gwa_ref, gwmu_ref, gba_ref, gbmu_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    gh_ref[...] = (mm(ga_c, wa_ref[...], nt) + mm(gmu_c, wmu_ref[...], nt)).astype(gh_ref.dtype)
    hv = jnp.where(common.rows(block_n, c, n), h_ref[...], 0)  # padding rows may hold NaN
    gwa_ref[...] += mm(hv, ga_c, tn)
    gwmu_ref[...] += mm(hv, gmu_c, tn)
    gba_ref[...] += jnp.sum(ga, axis=0, keepdims=True)
    gbmu_ref[...] += jnp.sum(gmu, axis=0, keepdims=True)


def bwd_build(cfg: common.KernelCfg, target: str, call=common.pallas_call):
    def run(h, wa, wmu, ba, bmu, x, mask, gz, gsls, gsz2):
        bsz, n, c = h.shape
        d = x.shape[-1]
        block_n = _block_n(cfg, n)
        args, in_specs = common.backward_inputs(
            h, wa, wmu, ba, bmu, x, mask, gz, gsls, gsz2, cfg=cfg, block_n=block_n, dp=d
        )
        row = lambda width: common.row_spec(block_n, width)
        acc = lambda r: pl.BlockSpec((common.SQUEEZED, r, d), lambda i, j: (i, 0, 0))
        sds = jax.ShapeDtypeStruct
        kernel = functools.partial(
            _bwd_kernel, cfg=cfg, n=n, block_n=block_n, masked=mask is not None
        )
        gh, gx, *partials = call(
            kernel,
            name="flow_affine_bwd",
            grid=(bsz, pl.cdiv(n, block_n)),
            in_specs=in_specs,
            out_specs=[row(c), row(d), acc(c), acc(c), acc(1), acc(1)],
            out_shape=[sds(h.shape, h.dtype), sds(x.shape, x.dtype)]
            + [sds((bsz, r, d), jnp.float32) for r in (c, c, 1, 1)],
            interpret=target == "interpret",
            compiler_params=_compiler_params(target, ("parallel", "arbitrary")),
            cost=common.backward_cost(
                h, wa, x, d, matmul_flops=12, extra_bytes=bsz * (2 * c + 2) * d * 4
            ),
            args=args,
        )
        gwa, gwmu, gba, gbmu = (jnp.sum(p[..., :d], axis=0) for p in partials)
        return common.cast_grads(gh, gwa, gwmu, gba, gbmu, gx, wa, wmu, ba, bmu, d)

    return run


# -- sampling -----------------------------------------------------------------------------------


def sample_build(cfg: common.KernelCfg, target: str, call=common.pallas_call):
    def run(a_c, a_u, mu_c, mu_u, z, w):
        bsz, d = z.shape
        bb = bsz if bsz <= 1024 else 512
        tile = pl.BlockSpec((bb, d), lambda i: (i, 0))
        out = jax.ShapeDtypeStruct((bsz, d), jnp.float32)
        return tuple(
            call(
                functools.partial(common.sample_kernel, soft=cfg.use_softplus),
                name="flow_guided_sample",
                grid=(pl.cdiv(bsz, bb),),
                in_specs=[tile] * 5 + [pl.BlockSpec((1, 1), lambda i: (0, 0))],
                out_specs=[tile] * 3,
                out_shape=[out] * 3,
                interpret=target == "interpret",
                compiler_params=_compiler_params(target, ("parallel",)),
                cost=common.sample_cost(bsz, d),
                args=(a_c, a_u, mu_c, mu_u, z, w),
            )
        )

    return run


BUILDERS = {"fwd": fwd_build, "bwd": bwd_build, "sample": sample_build}
