"""Fused causal-flow affine step: the head of one autoregressive-flow block, as Pallas kernels.

Math (STARFlow conventions, everything in fp32 whatever the operand dtype):

    o = h @ W + b                      h (B, N, C), W (C, 2D), b (2D,); fp32 accumulation
    o = c * tanh(o / c)                only when soft_clip = c > 0
    a, mu = o[..., :D], o[..., D:]
    sigma = softplus(a + log(e - 1))   (use_softplus; a = 0 gives sigma = 1) or exp(a)
    z = (x - mu) / sigma               x (B, N, D)
    sum_log_sigma[b] = sum_{n,d} log sigma,   sum_z2[b] = sum_{n,d} z^2

Training direction (`affine_forward`, impl="pallas"): one forward kernel does the matmul, clip,
split, scale, z and both reductions per tile, so the (B, N, 2D) head output never reaches
memory. Grid (B, cdiv(N, block_n)); every program writes its z rows and one (1, D) row of
per-column partial sums for each reduction, which the wrapper adds up (cross-program
accumulation is not portable: Triton programs run concurrently). W and b are split into their
`a` and `mu` halves in the wrapper, so a tile does two (C, D) matmuls instead of lane-slicing
at offset D. The backward pass is a second kernel under `jax.custom_vjp`: it recomputes o from
(h, W, b) (nothing of size (B, N, 2D) is saved) and writes grads for h and x. Weight and bias
grads: the TPU body accumulates them over the N-blocks of an example in its resident output
block (N grid axis "arbitrary"), so only (B, C, 2D) partials reach memory and the wrapper sums
over B; Triton programs cannot accumulate, and per-program (C, 2D) partials would out-weigh h,
so the Triton body writes the head-output grads [ga | gmu] (B, N, 2D) in the matmul dtype and
the wrapper does gW = h^T [ga | gmu] as one XLA matmul (one more read of h).

Precision: matmuls take the promoted operand dtype (bf16 operands stay bf16, fp32 stays fp32)
with fp32 accumulation; the backward casts [ga | gmu] to that dtype before its matmuls. The
reference uses XLA's default dot precision, which on TPU (and with TF32 on GPU) is below fp32.

Sampling direction (`guided_sample_step`): one token of a doubled batch [cond; uncond], STARFlow's
Gaussian-product classifier-free guidance, as one elementwise kernel.

Backends and what each requires (`is_supported` checks them; the pallas path otherwise falls
back to the reference and logs why, once per reason):

- every backend: h and W float32 / bfloat16 / float16, x and b floating; block_n a power of two
  in [16, 4096] (default: 256 on TPU and in interpret mode, 64 on GPU, capped at the next
  power of two >= N).
- interpret mode (CPU, default there): nothing more; the TPU kernel body runs in the HLO
  interpreter.
- TPU (Mosaic): C and D are full-extent block dims (any size), block_n a multiple of 8 (implied),
  the tail N-block reads padding and its writes are dropped, so tail rows are masked with
  `where`. The backward tile must fit the VMEM budget (`_TPU_VMEM_LIMIT`); `is_supported`
  estimates it.
- GPU (Triton): every loaded / stored array has a power-of-two size and dot dims are >= 16, so
  the wrapper zero-pads D up to max(16, next_pow2(D)) (x, W and b columns; padded columns have
  a = mu = x = 0, so sigma = 1, z = 0, and they are sliced off before the reductions), and the
  kernel walks C in power-of-two chunks: C must be a multiple of 16. Tail rows use masked
  loads and stores (Triton does not bounds-check blocks).
- lowering from a CPU host with interpret=False: the kernel is chosen per platform at lowering
  time (`lax.platform_dependent`), so one traced function lowers for TPU and for GPU; the
  constraints of both apply. On a platform with no Pallas compiler (CPU) it runs interpreted.

Sharding: under a mesh with some of `batch_axes` (total size > 1 dividing B), the pallas path
runs inside `jax.shard_map` over those axes (h, x and the outputs split on batch; W, b
replicated), because a compiled Pallas kernel is an opaque custom call to the partitioner.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLS = ("xla", "pallas")
SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(SOFTPLUS_ONE) = 1: sigma = 1 when a = 0
_OPERAND_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_TPU_VMEM_LIMIT = 48 * 2**20  # scoped-VMEM request; fits v5e/v5p/v6e (128 MiB) and v7x (64)
_DEFAULT_BLOCK_N = {"tpu": 256, "interpret": 128, "triton": 64}
_TRITON_MAX_CHUNK = 64  # C is walked in chunks of at most this many columns on GPU
_SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None

log = logging.getLogger(__name__)
_logged_reasons: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        log.warning("flow_affine: Pallas kernel not used, falling back to XLA: %s", reason)


# -- pure-jnp references ------------------------------------------------------------------------


def _sigma_and_log(a: jax.Array, use_softplus: bool) -> tuple[jax.Array, jax.Array]:
    if use_softplus:
        sigma = jax.nn.softplus(a + SOFTPLUS_ONE)
        return sigma, jnp.log(sigma)
    return jnp.exp(a), a


def _soft_clip(o: jax.Array, soft_clip: float) -> jax.Array:
    return soft_clip * jnp.tanh(o / soft_clip) if soft_clip > 0 else o


def affine_forward_reference(h, w, b, x, *, soft_clip: float, use_softplus: bool):
    """Pure jnp: (z (B, N, D) fp32, sum_log_sigma (B,), sum_z2 (B,))."""
    o = jnp.dot(h, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    o = _soft_clip(o, soft_clip)
    a, mu = jnp.split(o, 2, axis=-1)
    sigma, log_sigma = _sigma_and_log(a, use_softplus)
    z = (x.astype(jnp.float32) - mu) / sigma
    return z, jnp.sum(log_sigma, axis=(1, 2)), jnp.sum(jnp.square(z), axis=(1, 2))


def _guided_math(a_c, a_u, mu_c, mu_u, z, w, use_softplus):
    """Gaussian-product CFG on fp32 arrays (shared by the reference and the kernel body)."""
    sigma_c, _ = _sigma_and_log(a_c, use_softplus)
    sigma_u, _ = _sigma_and_log(a_u, use_softplus)
    s = jnp.square(jnp.minimum(sigma_c / sigma_u, 1.0))
    denom = 1.0 + w - w * s
    mu_eff = ((1.0 + w) * mu_c - w * s * mu_u) / denom
    sigma_eff = sigma_c * jax.lax.rsqrt(denom)
    return mu_eff + sigma_eff * z, mu_eff, sigma_eff


def guided_sample_step_reference(a, mu, z, guidance, *, use_softplus: bool):
    """Pure jnp: a, mu (2B, D) = [cond; uncond] head outputs, z (B, D) -> (x, mu_eff, sigma_eff)."""
    bsz = z.shape[0]
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    a, mu, w = f32(a), f32(mu), f32(guidance)
    return _guided_math(a[:bsz], a[bsz:], mu[:bsz], mu[bsz:], f32(z), w, use_softplus)


# -- support checks -----------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _resolve_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _targets(interpret: bool, platform: str | None) -> tuple[str, ...]:
    """Kernel variants a call may lower to: subset of ("interpret", "tpu", "triton")."""
    if platform is None:
        if interpret:
            return ("interpret",)
        platform = jax.default_backend()
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform == "interpret":
        return ("interpret",)
    if platform == "tpu":
        return ("tpu",)
    if platform == "gpu":
        return ("triton",)
    # No Pallas compiler here (a CPU host lowering for an accelerator): both may be chosen.
    return ("tpu", "triton")


def _default_block_n(n: int, target: str) -> int:
    return max(16, min(_DEFAULT_BLOCK_N[target], _next_pow2(n)))


def _tpu_backward_vmem(block_n: int, c: int, d: int, h_bytes: int, w_bytes: int) -> int:
    """Rough VMEM bytes of the backward tile (the larger kernel), double-buffered, lanes padded."""
    dl = -(-d // 128) * 128
    io = block_n * c * 2 * h_bytes + 2 * c * dl * (w_bytes + 4) + 3 * block_n * dl * 4
    return 2 * io + block_n * c * 4 + 8 * block_n * dl * 4


def is_supported(
    impl: str,
    h=None,
    w=None,
    x=None,
    *,
    block_n: int | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> tuple[bool, str]:
    """Whether `affine_forward(h, w, b, x, impl=impl, ...)` can run its kernel: (ok, reason).

    h, w, x: arrays or ShapeDtypeStructs (None skips the shape checks). platform: "tpu", "gpu",
    "interpret" or None (what the call would target: interpret mode, else the default backend;
    a CPU host with interpret=False may lower for TPU or GPU, so both sets of rules apply).
    """
    if impl not in IMPLS:
        return False, f"unknown impl {impl!r}; expected one of {IMPLS}"
    if impl == "xla":
        return True, "reference implementation (XLA)"
    targets = _targets(_resolve_interpret(interpret), platform)
    if block_n is not None and not (_is_pow2(block_n) and 16 <= block_n <= 4096):
        return False, f"block_n={block_n} must be a power of two in [16, 4096]"
    if h is None or w is None or x is None:
        return True, f"pallas ({', '.join(targets)})"
    for name, arr in (("h", h), ("w", w)):
        if jnp.dtype(arr.dtype) not in map(jnp.dtype, _OPERAND_DTYPES):
            return False, f"{name} dtype {jnp.dtype(arr.dtype).name} is not f32/bf16/f16"
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return False, f"x dtype {jnp.dtype(x.dtype).name} is not floating"
    _, n, c = h.shape
    d = x.shape[-1]
    if "triton" in targets and c % 16:
        return False, f"Triton walks C in power-of-two chunks >= 16: C={c} is not a multiple of 16"
    if "tpu" in targets:
        bn = block_n or _default_block_n(n, "tpu")
        hb, wb = jnp.dtype(h.dtype).itemsize, jnp.dtype(w.dtype).itemsize
        need = _tpu_backward_vmem(bn, c, d, hb, wb)
        if need > _TPU_VMEM_LIMIT:
            return False, (
                f"TPU tile needs ~{need / 2**20:.0f} MiB VMEM > {_TPU_VMEM_LIMIT / 2**20:.0f} MiB "
                f"(block_n={bn}, C={c}, D={d}): lower block_n"
            )
    return True, f"pallas ({', '.join(targets)})"


# -- kernel plumbing ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cfg:
    soft_clip: float
    use_softplus: bool
    block_n: int | None
    interpret: bool
    variant: str | None = None  # test hook: force "tpu" / "triton" body (in interpret mode)
    poison: bool = False  # test hook: alias NaN-filled output buffers into the kernel


def _compiler_params(target: str, semantics: tuple[str, ...]):
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=_TPU_VMEM_LIMIT)
    if target == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def _dispatch(cfg: _Cfg, build, *args):
    """Run `build(body, target)(*args)` for the platform the computation is lowered for.

    body: "tpu" or "triton" kernel body; target: "tpu", "triton" (compiled) or "interpret".
    """
    if cfg.interpret:
        return build(cfg.variant or "tpu", "interpret")(*args)
    return jax.lax.platform_dependent(
        *args,
        tpu=build("tpu", "tpu"),
        cuda=build("triton", "triton"),
        rocm=build("triton", "triton"),
        default=build(cfg.variant or "tpu", "interpret"),
    )


def _pallas_call(
    kernel,
    *,
    name,
    grid,
    in_specs,
    out_specs,
    out_shape,
    target,
    cost,
    poison,
    args,
    semantics=None,
):
    """pallas_call; with `poison`, NaN-filled buffers are aliased to the outputs first.

    semantics: TPU dimension semantics per grid axis (default: all "parallel").
    """
    aliases = {}
    if poison:
        bufs = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        aliases = {len(args) + i: i for i in range(len(bufs))}
        args = (*args, *bufs)
        in_specs = [*in_specs, *out_specs]
        n_out = len(out_shape)
        inner = kernel

        def kernel(*refs):  # noqa: F811 - drops the aliased input refs
            inner(*refs[: len(refs) - 2 * n_out], *refs[len(refs) - n_out :])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=target == "interpret",
        name=name,
        compiler_params=_compiler_params(target, semantics or ("parallel",) * len(grid)),
        cost_estimate=cost,
    )(*args)


def _rows(block_n: int, width: int, n: int) -> jax.Array:
    """(block_n, width) bool: which rows of this N-block are inside the sequence."""
    row = jax.lax.broadcasted_iota(jnp.int32, (block_n, width), 0)
    return pl.program_id(1) * block_n + row < n


def _chunk(c: int) -> int:
    """Triton C-chunk: the largest power of two <= _TRITON_MAX_CHUNK dividing C."""
    return math.gcd(c, _TRITON_MAX_CHUNK)


def _load_rows(ref, valid, body):
    """Load a (block_n, width) tile; Triton masks the rows past N (TPU pads them itself)."""
    if body == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.load(ref, mask=valid, other=0)
    return ref[...]


def _store_rows(ref, val, valid, body):
    if body == "triton":
        from jax.experimental.pallas import triton as pltriton

        pltriton.store(ref, val.astype(ref.dtype), mask=valid)
    else:
        ref[...] = val.astype(ref.dtype)


def _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, *, n, block_n, body):
    """fp32 pre-clip head outputs (o_a, o_mu), each (block_n, Dp), for this tile."""
    c, d = wa_ref.shape
    cd = jnp.promote_types(h_ref.dtype, wa_ref.dtype)
    dot = lambda p, q: jax.lax.dot(p.astype(cd), q.astype(cd), preferred_element_type=jnp.float32)
    if body == "tpu":
        hv = h_ref[...]
        oa, om = dot(hv, wa_ref[...]), dot(hv, wmu_ref[...])
    else:
        bc = _chunk(c)
        valid = _rows(block_n, bc, n)

        def step(k, acc):
            cols = pl.ds(pl.multiple_of(k * bc, bc), bc)
            hk = _load_rows(h_ref.at[:, cols], valid, body)
            return acc[0] + dot(hk, wa_ref[cols, :]), acc[1] + dot(hk, wmu_ref[cols, :])

        zeros = jnp.zeros((block_n, d), jnp.float32)
        oa, om = jax.lax.fori_loop(0, c // bc, step, (zeros, zeros))
    return oa + ba_ref[...].astype(jnp.float32), om + bmu_ref[...].astype(jnp.float32)


def _affine_tile(oa, om, x, cfg: _Cfg):
    """Clip, split, scale: (a, mu, sigma, log_sigma, z, clip-derivative factors)."""
    if cfg.soft_clip > 0:
        c = cfg.soft_clip
        ta, tm = jnp.tanh(oa / c), jnp.tanh(om / c)
        a, mu = c * ta, c * tm
        da, dm = 1.0 - ta * ta, 1.0 - tm * tm
    else:
        a, mu, da, dm = oa, om, None, None
    sigma, log_sigma = _sigma_and_log(a, cfg.use_softplus)
    z = (x.astype(jnp.float32) - mu) / sigma
    return a, sigma, log_sigma, z, da, dm


def _pad_cols(v: jax.Array, dp: int) -> jax.Array:
    d = v.shape[-1]
    return v if d == dp else jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, dp - d)])


def _plan(cfg: _Cfg, body: str, n: int, d: int) -> tuple[int, int]:
    """(block_n, padded D) for a kernel body."""
    target = "triton" if body == "triton" else ("interpret" if cfg.interpret else "tpu")
    block_n = cfg.block_n or _default_block_n(n, target)
    dp = max(16, _next_pow2(d)) if body == "triton" else d
    return block_n, dp


# -- forward kernel -----------------------------------------------------------------------------


def _fwd_kernel(
    h_ref,
    wa_ref,
    wmu_ref,
    ba_ref,
    bmu_ref,
    x_ref,
    z_ref,
    sls_ref,
    sz2_ref,
    *,
    cfg,
    n,
    block_n,
    body,
):
    oa, om = _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, n=n, block_n=block_n, body=body)
    valid = _rows(block_n, oa.shape[1], n)
    x = _load_rows(x_ref, valid, body)
    _, _, log_sigma, z, _, _ = _affine_tile(oa, om, x, cfg)
    _store_rows(z_ref, z, valid, body)
    sls_ref[...] = jnp.sum(jnp.where(valid, log_sigma, 0.0), axis=0, keepdims=True)
    sz2_ref[...] = jnp.sum(jnp.where(valid, z * z, 0.0), axis=0, keepdims=True)


def _fwd_build(cfg: _Cfg, body: str, target: str):
    def run(h, wa, wmu, ba, bmu, x):
        bsz, n, c = h.shape
        d = x.shape[-1]
        block_n, dp = _plan(cfg, body, n, d)
        nb = pl.cdiv(n, block_n)
        wa, wmu, x = _pad_cols(wa, dp), _pad_cols(wmu, dp), _pad_cols(x, dp)
        ba, bmu = _pad_cols(ba.reshape(1, d), dp), _pad_cols(bmu.reshape(1, d), dp)
        row = lambda width: pl.BlockSpec((_SQUEEZED, block_n, width), lambda i, j: (i, j, 0))
        full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
        part = pl.BlockSpec((_SQUEEZED, _SQUEEZED, 1, dp), lambda i, j: (i, j, 0, 0))
        part_shape = jax.ShapeDtypeStruct((bsz, nb, 1, dp), jnp.float32)
        rows = bsz * n
        cost = pl.CostEstimate(
            flops=int(4 * rows * c * dp + 12 * rows * dp),
            transcendentals=int(4 * rows * dp),
            bytes_accessed=int(
                h.size * h.dtype.itemsize
                + 2 * wa.size * wa.dtype.itemsize
                + x.size * x.dtype.itemsize
                + rows * dp * 4
            ),
        )
        z, sls, sz2 = _pallas_call(
            functools.partial(_fwd_kernel, cfg=cfg, n=n, block_n=block_n, body=body),
            name="flow_affine_fwd",
            grid=(bsz, nb),
            in_specs=[row(c), full((c, dp)), full((c, dp)), full((1, dp)), full((1, dp)), row(dp)],
            out_specs=[row(dp), part, part],
            out_shape=[jax.ShapeDtypeStruct((bsz, n, dp), jnp.float32), part_shape, part_shape],
            target=target,
            cost=cost,
            poison=cfg.poison,
            args=(h, wa, wmu, ba, bmu, x),
        )
        # Padded columns have z = 0 and log sigma = 0 up to rounding: drop them before summing.
        return z[..., :d], jnp.sum(sls[..., :d], (1, 2, 3)), jnp.sum(sz2[..., :d], (1, 2, 3))

    return run


# -- backward kernel ----------------------------------------------------------------------------


def _bwd_kernel(
    h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, x_ref, gz_ref, gsls_ref, gsz2_ref, *outs,
    cfg, n, block_n, body,
):  # fmt: skip
    """TPU body outs: gh, gx, gWa, gWmu, gba, gbmu (weight / bias grads accumulated per example).
    Triton body outs: gh, gx, ga, gmu (head-output grads; the wrapper does the weight grads)."""
    c, d = wa_ref.shape
    oa, om = _head(h_ref, wa_ref, wmu_ref, ba_ref, bmu_ref, n=n, block_n=block_n, body=body)
    valid = _rows(block_n, d, n)
    x = _load_rows(x_ref, valid, body)
    gz = _load_rows(gz_ref, valid, body).astype(jnp.float32)
    a, sigma, _, z, da, dm = _affine_tile(oa, om, x, cfg)
    gsls = gsls_ref[...].astype(jnp.float32)  # (1, Dp): this example's cotangent, broadcast
    gsz2 = gsz2_ref[...].astype(jnp.float32)
    inv = 1.0 / sigma
    gx = (gz + 2.0 * z * gsz2) * inv  # d/dx of z and of sum z^2
    gsig = gsls * inv - gx * z
    if cfg.use_softplus:
        ga = gsig * jax.nn.sigmoid(a + SOFTPLUS_ONE)  # d softplus(a + k) / da
    else:
        ga = gsig * sigma  # d exp(a) / da
    gmu = -gx
    if da is not None:
        ga, gmu = ga * da, gmu * dm
    ga = jnp.where(valid, ga, 0.0)
    gmu = jnp.where(valid, gmu, 0.0)
    gh_ref, gx_ref = outs[:2]
    _store_rows(gx_ref, gx, valid, body)

    cd = jnp.promote_types(h_ref.dtype, wa_ref.dtype)
    nt = (((1,), (1,)), ((), ()))  # (block_n, Dp) x (bc, Dp) -> (block_n, bc)
    tn = (((0,), (0,)), ((), ()))  # (block_n, C) x (block_n, Dp) -> (C, Dp)
    mm = lambda p, q, dims: jax.lax.dot_general(
        p.astype(cd), q.astype(cd), dims, preferred_element_type=jnp.float32
    )
    ga_c, gmu_c = ga.astype(cd), gmu.astype(cd)
    if body == "tpu":
        gwa_ref, gwmu_ref, gba_ref, gbmu_ref = outs[2:]

        # Weight / bias grads accumulate over the N-blocks of one example in the resident output
        # block (the N grid axis is sequential, "arbitrary"): (B, C, D) partials only.
        @pl.when(pl.program_id(1) == 0)
        def _init():
            for ref in (gwa_ref, gwmu_ref, gba_ref, gbmu_ref):
                ref[...] = jnp.zeros(ref.shape, ref.dtype)

        gh_ref[...] = (mm(ga_c, wa_ref[...], nt) + mm(gmu_c, wmu_ref[...], nt)).astype(gh_ref.dtype)
        hv = jnp.where(_rows(block_n, c, n), h_ref[...], 0)  # padding rows may hold NaN
        gwa_ref[...] += mm(hv, ga_c, tn)
        gwmu_ref[...] += mm(hv, gmu_c, tn)
        gba_ref[...] += jnp.sum(ga, axis=0, keepdims=True)
        gbmu_ref[...] += jnp.sum(gmu, axis=0, keepdims=True)
    else:
        # Triton programs run concurrently, so they cannot accumulate weight grads, and one
        # (C, 2D) partial per program would out-weigh h itself: emit the head-output grads.
        ga_ref, gmu_ref = outs[2:]
        _store_rows(ga_ref, ga_c, valid, body)
        _store_rows(gmu_ref, gmu_c, valid, body)
        bc = _chunk(c)
        valid_c = _rows(block_n, bc, n)

        def step(k, carry):
            cols = pl.ds(pl.multiple_of(k * bc, bc), bc)
            ghk = mm(ga_c, wa_ref[cols, :], nt) + mm(gmu_c, wmu_ref[cols, :], nt)
            _store_rows(gh_ref.at[:, cols], ghk, valid_c, body)
            return carry

        jax.lax.fori_loop(0, c // bc, step, 0)


def _bwd_build(cfg: _Cfg, body: str, target: str):
    def run(h, wa, wmu, ba, bmu, x, gz, gsls, gsz2):
        bsz, n, c = h.shape
        d = x.shape[-1]
        block_n, dp = _plan(cfg, body, n, d)
        nb = pl.cdiv(n, block_n)
        cd = jnp.promote_types(h.dtype, wa.dtype)
        pw, px = _pad_cols(wa, dp), _pad_cols(x, dp)
        args = (
            h,
            pw,
            _pad_cols(wmu, dp),
            _pad_cols(ba.reshape(1, d), dp),
            _pad_cols(bmu.reshape(1, d), dp),
            px,
            _pad_cols(gz.astype(jnp.float32), dp),
            jnp.broadcast_to(gsls.astype(jnp.float32)[:, None, None], (bsz, 1, dp)),
            jnp.broadcast_to(gsz2.astype(jnp.float32)[:, None, None], (bsz, 1, dp)),
        )
        row = lambda width: pl.BlockSpec((_SQUEEZED, block_n, width), lambda i, j: (i, j, 0))
        full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
        per_example = pl.BlockSpec((_SQUEEZED, 1, dp), lambda i, j: (i, 0, 0))
        sds = jax.ShapeDtypeStruct
        out_specs = [row(c), row(dp)]
        out_shape = [sds(h.shape, h.dtype), sds(px.shape, x.dtype)]
        if body == "tpu":  # weight / bias grads accumulated over the N-blocks in the kernel
            acc = lambda r: pl.BlockSpec((_SQUEEZED, r, dp), lambda i, j: (i, 0, 0))
            out_specs += [acc(c), acc(c), acc(1), acc(1)]
            out_shape += [sds((bsz, r, dp), jnp.float32) for r in (c, c, 1, 1)]
            semantics, extra_bytes = ("parallel", "arbitrary"), bsz * (2 * c + 2) * dp * 4
        else:  # head-output grads, (B, N, Dp) each
            out_specs += [row(dp), row(dp)]
            out_shape += [sds(px.shape, cd)] * 2
            semantics, extra_bytes = None, 2 * px.size * jnp.dtype(cd).itemsize
        rows = bsz * n
        cost = pl.CostEstimate(
            flops=int((12 if body == "tpu" else 8) * rows * c * dp + 40 * rows * dp),
            transcendentals=int(6 * rows * dp),
            bytes_accessed=int(
                2 * h.size * h.dtype.itemsize
                + 2 * pw.size * pw.dtype.itemsize
                + 3 * px.size * px.dtype.itemsize
                + extra_bytes
            ),
        )
        gh, gx, *rest = _pallas_call(
            functools.partial(_bwd_kernel, cfg=cfg, n=n, block_n=block_n, body=body),
            name="flow_affine_bwd",
            grid=(bsz, nb),
            in_specs=[row(c), full((c, dp)), full((c, dp)), full((1, dp)), full((1, dp)),
                      row(dp), row(dp), per_example, per_example],
            out_specs=out_specs,
            out_shape=out_shape,
            target=target,
            cost=cost,
            poison=cfg.poison,
            args=args,
            semantics=semantics,
        )  # fmt: skip
        if body == "tpu":
            gwa, gwmu, gba, gbmu = (jnp.sum(p[..., :d], axis=0) for p in rest)
        else:  # weight grads as one XLA matmul over all rows: h^T [ga | gmu]
            ga, gmu = (p[..., :d] for p in rest)
            wgrad = lambda g: jnp.einsum("bnc,bnd->cd", h.astype(cd), g,
                                         preferred_element_type=jnp.float32)  # fmt: skip
            gwa, gwmu = wgrad(ga), wgrad(gmu)
            gba, gbmu = (jnp.sum(g.astype(jnp.float32), axis=(0, 1))[None] for g in (ga, gmu))
        return (
            gh,
            gwa.astype(wa.dtype),
            gwmu.astype(wmu.dtype),
            gba.reshape(ba.shape).astype(ba.dtype),
            gbmu.reshape(bmu.shape).astype(bmu.dtype),
            gx[..., :d],
        )

    return run


# -- training-direction entry points ------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _affine_pallas(cfg: _Cfg, h, wa, wmu, ba, bmu, x):
    return _dispatch(cfg, lambda body, tgt: _fwd_build(cfg, body, tgt), h, wa, wmu, ba, bmu, x)


def _affine_pallas_fwd(cfg: _Cfg, h, wa, wmu, ba, bmu, x):
    # Residuals are the inputs only: the backward kernel recomputes the head output.
    return _affine_pallas(cfg, h, wa, wmu, ba, bmu, x), (h, wa, wmu, ba, bmu, x)


def _affine_pallas_bwd(cfg: _Cfg, res, cotangents):
    gz, gsls, gsz2 = cotangents
    build = lambda body, tgt: _bwd_build(cfg, body, tgt)
    return tuple(_dispatch(cfg, build, *res, gz, gsls, gsz2))


_affine_pallas.defvjp(_affine_pallas_fwd, _affine_pallas_bwd)


def _batch_shard_axes(batch_axes: tuple[str, ...], bsz: int):
    """(abstract mesh, axes) to shard_map the batch over, or (None, ()) when not sharding."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None, ()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    manual = set(getattr(mesh, "manual_axes", ()))  # already inside a shard_map over these
    axes = tuple(a for a in batch_axes if a in sizes and a not in manual and sizes[a] > 1)
    total = math.prod(sizes[a] for a in axes)
    if total <= 1 or bsz % total:
        return None, ()
    return mesh, axes


def _affine_forward_pallas(h, w, b, x, cfg: _Cfg, batch_axes: tuple[str, ...]):
    d = x.shape[-1]
    wa, wmu, ba, bmu = w[:, :d], w[:, d:], b[:d], b[d:]
    fn = functools.partial(_affine_pallas, cfg)
    mesh, axes = _batch_shard_axes(tuple(batch_axes), h.shape[0])
    if mesh is not None:
        P = jax.sharding.PartitionSpec
        batch, rep = P(axes), P()
        fn = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(batch, rep, rep, rep, rep, batch),
            out_specs=(batch, batch, batch),
            check_vma=False,
        )
    return fn(h, wa, wmu, ba, bmu, x)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: expected one of {IMPLS}")


def affine_forward(
    h,
    w,
    b,
    x,
    *,
    soft_clip: float,
    use_softplus: bool,
    impl: str = "xla",
    block_n: int | None = None,
    interpret: bool | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
):
    """Fused flow head: (z (B, N, D) fp32, sum_log_sigma (B,) fp32, sum_z2 (B,) fp32).

    h (B, N, C), w (C, 2D), b (2D,), x (B, N, D). impl: "xla" (reference) or "pallas" (kernel
    when `is_supported`, else the reference with a logged reason). interpret: None = interpret
    mode on a CPU backend; False = compile for the platform lowered for. Differentiable in
    h, w, b, x on both paths.
    """
    _check_impl(impl)
    chex.assert_rank([h, w, b, x], [3, 2, 1, 3])
    bsz, n, c = h.shape
    d = x.shape[-1]
    chex.assert_shape([w, b, x], [(c, 2 * d), (2 * d,), (bsz, n, d)])
    if impl == "xla":
        return affine_forward_reference(h, w, b, x, soft_clip=soft_clip, use_softplus=use_softplus)
    interp = _resolve_interpret(interpret)
    ok, reason = is_supported(impl, h, w, x, block_n=block_n, interpret=interp)
    if not ok:
        _log_fallback_once(reason)
        return affine_forward_reference(h, w, b, x, soft_clip=soft_clip, use_softplus=use_softplus)
    cfg = _Cfg(float(soft_clip), bool(use_softplus), block_n, interp)
    return _affine_forward_pallas(h, w, b, x, cfg, batch_axes)


# -- sampling direction -------------------------------------------------------------------------


def _sample_kernel(ac_ref, au_ref, mc_ref, mu_ref, z_ref, w_ref, x_ref, me_ref, se_ref, *, soft):
    f = lambda r: r[...].astype(jnp.float32)
    x, mu_eff, sigma_eff = _guided_math(
        f(ac_ref), f(au_ref), f(mc_ref), f(mu_ref), f(z_ref), f(w_ref), soft
    )
    x_ref[...], me_ref[...], se_ref[...] = x, mu_eff, sigma_eff


def _sample_build(cfg: _Cfg, body: str, target: str):
    def run(a_c, a_u, mu_c, mu_u, z, w):
        bsz, d = z.shape
        if body == "triton":  # power-of-two tiles: pad rows and columns (tiny arrays)
            bb = min(_next_pow2(bsz), 128)
            rows, dp = pl.cdiv(bsz, bb) * bb, _next_pow2(d)
            pad = lambda v: jnp.pad(v, ((0, rows - bsz), (0, dp - d)))
            a_c, a_u, mu_c, mu_u, z = map(pad, (a_c, a_u, mu_c, mu_u, z))
        else:
            bb, rows, dp = (bsz if bsz <= 1024 else 512), bsz, d
        tile = pl.BlockSpec((bb, dp), lambda i: (i, 0))
        out = jax.ShapeDtypeStruct((rows, dp), jnp.float32)
        x, mu_eff, sigma_eff = _pallas_call(
            functools.partial(_sample_kernel, soft=cfg.use_softplus),
            name="flow_guided_sample",
            grid=(pl.cdiv(rows, bb),),
            in_specs=[tile] * 5 + [pl.BlockSpec((1, 1), lambda i: (0, 0))],
            out_specs=[tile] * 3,
            out_shape=[out] * 3,
            target=target,
            cost=pl.CostEstimate(
                flops=int(20 * rows * dp),
                transcendentals=int(6 * rows * dp),
                bytes_accessed=int(8 * rows * dp * 4),
            ),
            poison=cfg.poison,
            args=(a_c, a_u, mu_c, mu_u, z, w),
        )
        return x[:bsz, :d], mu_eff[:bsz, :d], sigma_eff[:bsz, :d]

    return run


def _guided_sample_pallas(a, mu, z, guidance, cfg: _Cfg):
    bsz = z.shape[0]
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    a, mu, w = f32(a), f32(mu), f32(guidance).reshape(1, 1)
    build = lambda body, tgt: _sample_build(cfg, body, tgt)
    return tuple(_dispatch(cfg, build, a[:bsz], a[bsz:], mu[:bsz], mu[bsz:], f32(z), w))


def guided_sample_step(
    a, mu, z, guidance, *, use_softplus: bool, impl: str = "xla", interpret: bool | None = None
):
    """One guided sampling step: (x, mu_eff, sigma_eff), each (B, D) fp32.

    a, mu (2B, D): [cond; uncond] head outputs (already soft-clipped); z (B, D) noise;
    guidance w >= 0 (Python float or traced scalar). Gaussian-product CFG: s = min(sigma_c /
    sigma_u, 1)^2, denom = 1 + w - w s, mu_eff = ((1 + w) mu_c - w s mu_u) / denom,
    sigma_eff = sigma_c / sqrt(denom), x = mu_eff + sigma_eff z. w = 0 gives the conditional
    parameters exactly.
    """
    _check_impl(impl)
    chex.assert_rank([a, mu, z], 2)
    bsz, d = z.shape
    chex.assert_shape([a, mu], (2 * bsz, d))
    if impl == "xla":
        return guided_sample_step_reference(a, mu, z, guidance, use_softplus=use_softplus)
    cfg = _Cfg(0.0, bool(use_softplus), None, _resolve_interpret(interpret))
    return _guided_sample_pallas(a, mu, z, guidance, cfg)
