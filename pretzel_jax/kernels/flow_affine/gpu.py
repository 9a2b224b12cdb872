"""GPU (Triton) kernel bodies and builders.

Every loaded / stored array has a power-of-two size and dot dims are >= 16, so the wrapper
zero-pads D up to max(16, next_pow2(D)) (x, W and b columns; padded columns have a = mu = x = 0,
so sigma = 1, z = 0, and they are dropped before the reductions), and the kernel walks C in
power-of-two chunks: C must be a multiple of 16. Tail rows use masked loads and stores (Triton
does not bounds-check blocks). Triton programs run concurrently, so they cannot accumulate
across programs: the forward writes per-program partial sums that the wrapper adds up, and the
backward writes the head-output grads [ga | gmu] (B, N, 2D) in the matmul dtype (per-program
(C, 2D) weight-grad partials would out-weigh h) and the wrapper does gW = h^T [ga | gmu] as one
XLA matmul (one more read of h).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pretzel_jax.kernels.flow_affine import common, support

MAX_CHUNK = 64  # C is walked in chunks of at most this many columns


def _compiler_params(target: str):
    if target != "triton":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _plan(cfg: common.KernelCfg, n: int, d: int) -> tuple[int, int]:
    """(block_n, padded D)."""
    return cfg.block_n or support.default_block_n(n, "triton"), max(16, support.next_pow2(d))


def _chunk(c: int) -> int:
    """C-chunk: the largest power of two <= MAX_CHUNK dividing C."""
    return math.gcd(c, MAX_CHUNK)


def _load_rows(ref, valid):
    """Load a (block_n, width) tile; rows past N (masked off) read as 0."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref, mask=valid, other=0)


def _store_rows(ref, val, valid):
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(ref, val.astype(ref.dtype), mask=valid)


def _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, *, n, block_n):
    """fp32 pre-clip head outputs (o_a, o_mu), each (block_n, Dp), for this tile."""
    c, d = wa_ref.shape
    cd = jnp.promote_types(h_ref.dtype, wa_ref.dtype)
    dot = lambda p, q: jax.lax.dot(p.astype(cd), q.astype(cd), preferred_element_type=jnp.float32)
    bc = _chunk(c)
    valid = common.rows(block_n, bc, n)

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * bc, bc), bc)
        hk = _load_rows(h_ref.at[:, cols], valid)
        return acc[0] + dot(hk, wa_ref[cols, :]), acc[1] + dot(hk, wmu_ref[cols, :])

    zeros = jnp.zeros((block_n, d), jnp.float32)
    oa, om = jax.lax.fori_loop(0, c // bc, step, (zeros, zeros))
    return oa + ba_ref[...].astype(jnp.float32), om + bmu_ref[...].astype(jnp.float32)


# -- forward ------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg, n, d, block_n, masked):
    """refs: h, wa, wmu, ba, bmu, x, [mask], then outs z, sls, sz2 (x, W, b, z: Dp columns)."""
    h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, x_ref, *refs = refs
    m_ref = refs.pop(0) if masked else None
    z_ref, sls_ref, sz2_ref = refs
    oa, om = _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, n=n, block_n=block_n)
    valid = common.rows(block_n, oa.shape[1], n)
    x = _load_rows(x_ref, valid)
    _, _, log_sigma, z, _, _ = common.affine_tile(oa, om, x, cfg)
    _store_rows(z_ref, z, valid)
    z2 = z * z
    valid_1 = common.rows(block_n, 1, n) if masked or cfg.per_position else None
    if masked:
        m = _load_rows(m_ref, valid_1)  # (block_n, 1)
        log_sigma, z2 = log_sigma * m, z2 * m
    sls, sz2 = (common.reduce_tile(v, valid, cfg, d) for v in (log_sigma, z2))
    if cfg.per_position:  # (block_n, 1) columns, rows past N masked off
        _store_rows(sls_ref, sls, valid_1)
        _store_rows(sz2_ref, sz2, valid_1)
    else:  # one (1, Dp) row per program
        sls_ref[...] = sls
        sz2_ref[...] = sz2


def fwd_build(cfg: common.KernelCfg, target: str, call=common.pallas_call):
    """target: "triton" (compiled) or "interpret". call: the pallas_call runner."""

    def run(h, wa, wmu, ba, bmu, x, mask=None):
        n, d = h.shape[1], x.shape[-1]
        block_n, dp = _plan(cfg, n, d)
        kernel = functools.partial(
            _fwd_kernel, cfg=cfg, n=n, d=d, block_n=block_n, masked=mask is not None
        )
        return common.forward(
            kernel, h, wa, wmu, ba, bmu, x, mask,
            cfg=cfg, block_n=block_n, dp=dp, interpret=target == "interpret",
            params=_compiler_params(target), call=call,
        )  # fmt: skip

    return run


# -- backward -----------------------------------------------------------------------------------


def _bwd_kernel(*refs, cfg, n, block_n, masked):
    """refs: h, wa, wmu, ba, bmu, x, [mask], gz, gsls, gsz2, then outs gh, gx, ga, gmu (head-output
    grads; the wrapper does the weight grads)."""
    h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, x_ref, *refs = refs
    m_ref = refs.pop(0) if masked else None
    gz_ref, gsls_ref, gsz2_ref, gh_ref, gx_ref, ga_ref, gmu_ref = refs
    c, d = wa_ref.shape
    oa, om = _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, n=n, block_n=block_n)
    valid = common.rows(block_n, d, n)
    valid_1 = common.rows(block_n, 1, n) if masked or cfg.per_position else None
    x = _load_rows(x_ref, valid)
    gz = _load_rows(gz_ref, valid).astype(jnp.float32)
    a, sigma, _, z, da, dm = common.affine_tile(oa, om, x, cfg)
    if cfg.per_position:  # (block_n, 1) columns
        gsls = _load_rows(gsls_ref, valid_1).astype(jnp.float32)
        gsz2 = _load_rows(gsz2_ref, valid_1).astype(jnp.float32)
    else:  # (1, Dp): this example's cotangent, broadcast
        gsls = gsls_ref[...].astype(jnp.float32)
        gsz2 = gsz2_ref[...].astype(jnp.float32)
    if masked:
        m = _load_rows(m_ref, valid_1)
        gsls, gsz2 = gsls * m, gsz2 * m
    gx, ga, gmu = common.tile_grads(a, sigma, z, da, dm, gz, gsls, gsz2, cfg.use_softplus)
    ga = jnp.where(valid, ga, 0.0)
    gmu = jnp.where(valid, gmu, 0.0)
    _store_rows(gx_ref, gx, valid)

    cd = jnp.promote_types(h_ref.dtype, wa_ref.dtype)
    nt = (((1,), (1,)), ((), ()))  # (block_n, Dp) x (bc, Dp) -> (block_n, bc)
    mm = lambda p, q, dims: jax.lax.dot_general(
        p.astype(cd), q.astype(cd), dims, preferred_element_type=jnp.float32
    )
    ga_c, gmu_c = ga.astype(cd), gmu.astype(cd)
    _store_rows(ga_ref, ga_c, valid)
    _store_rows(gmu_ref, gmu_c, valid)
    bc = _chunk(c)
    valid_c = common.rows(block_n, bc, n)

    def step(k, carry):
        cols = pl.ds(pl.multiple_of(k * bc, bc), bc)
        ghk = mm(ga_c, wa_ref[cols, :], nt) + mm(gmu_c, wmu_ref[cols, :], nt)
        _store_rows(gh_ref.at[:, cols], ghk, valid_c)
        return carry

    jax.lax.fori_loop(0, c // bc, step, 0)


def bwd_build(cfg: common.KernelCfg, target: str, call=common.pallas_call):
    def run(h, wa, wmu, ba, bmu, x, mask, gz, gsls, gsz2):
        bsz, n, c = h.shape
        d = x.shape[-1]
        block_n, dp = _plan(cfg, n, d)
        cd = jnp.promote_types(h.dtype, wa.dtype)
        args, in_specs = common.backward_inputs(
            h, wa, wmu, ba, bmu, x, mask, gz, gsls, gsz2, cfg=cfg, block_n=block_n, dp=dp
        )
        row = lambda width: common.row_spec(block_n, width)
        sds = jax.ShapeDtypeStruct
        kernel = functools.partial(
            _bwd_kernel, cfg=cfg, n=n, block_n=block_n, masked=mask is not None
        )
        gh, gx, ga, gmu = call(
            kernel,
            name="flow_affine_bwd",
            grid=(bsz, pl.cdiv(n, block_n)),
            in_specs=in_specs,
            out_specs=[row(c), row(dp), row(dp), row(dp)],
            out_shape=[sds(h.shape, h.dtype), sds((bsz, n, dp), x.dtype)]
            + [sds((bsz, n, dp), cd)] * 2,
            interpret=target == "interpret",
            compiler_params=_compiler_params(target),
            cost=common.backward_cost(
                h, wa, x, dp, matmul_flops=8, extra_bytes=2 * bsz * n * dp * jnp.dtype(cd).itemsize
            ),
            args=args,
        )
        # Weight grads as one XLA matmul over all rows: h^T [ga | gmu].
        ga, gmu = ga[..., :d], gmu[..., :d]
        wgrad = lambda g: jnp.einsum("bnc,bnd->cd", h.astype(cd), g,
                                     preferred_element_type=jnp.float32)  # fmt: skip
        gwa, gwmu = wgrad(ga), wgrad(gmu)
        gba, gbmu = (jnp.sum(g.astype(jnp.float32), axis=(0, 1))[None] for g in (ga, gmu))
        return common.cast_grads(gh, gwa, gwmu, gba, gbmu, gx, wa, wmu, ba, bmu, d)

    return run


# -- sampling -----------------------------------------------------------------------------------


def sample_build(cfg: common.KernelCfg, target: str, call=common.pallas_call):
    def run(a_c, a_u, mu_c, mu_u, z, w):
        bsz, d = z.shape
        # Power-of-two tiles: pad rows and columns (tiny arrays).
        bb = min(support.next_pow2(bsz), 128)
        rows, dp = pl.cdiv(bsz, bb) * bb, support.next_pow2(d)
        pad = lambda v: jnp.pad(v, ((0, rows - bsz), (0, dp - d)))
        a_c, a_u, mu_c, mu_u, z = map(pad, (a_c, a_u, mu_c, mu_u, z))
        tile = pl.BlockSpec((bb, dp), lambda i: (i, 0))
        out = jax.ShapeDtypeStruct((rows, dp), jnp.float32)
        x, mu_eff, sigma_eff = call(
            functools.partial(common.sample_kernel, soft=cfg.use_softplus),
            name="flow_guided_sample",
            grid=(pl.cdiv(rows, bb),),
            in_specs=[tile] * 5 + [pl.BlockSpec((1, 1), lambda i: (0, 0))],
            out_specs=[tile] * 3,
            out_shape=[out] * 3,
            interpret=target == "interpret",
            compiler_params=_compiler_params(target),
            cost=common.sample_cost(rows, dp),
            args=(a_c, a_u, mu_c, mu_u, z, w),
        )
        return x[:bsz, :d], mu_eff[:bsz, :d], sigma_eff[:bsz, :d]

    return run


BUILDERS = {"fwd": fwd_build, "bwd": bwd_build, "sample": sample_build}
