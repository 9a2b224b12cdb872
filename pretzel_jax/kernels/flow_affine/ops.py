"""Public ops: `affine_forward` (training direction) and `guided_sample_step` (sampling).

Training direction (`affine_forward`, impl="pallas"): one forward kernel does the matmul, clip,
split, scale, z and both reductions per tile, so the (B, N, 2D) head output never reaches
memory. Grid (B, cdiv(N, block_n)); every program writes its z rows and one (1, D) row of
per-column partial sums for each reduction, which the wrapper adds up (cross-program
accumulation is not portable: Triton programs run concurrently); with per_position it writes
its rows' sums over D instead, (B, N). A mask (B, N) enters the kernels as a (block_n, 1) fp32
column that multiplies each position's log sigma and z^2 terms before they are summed (and, in
the backward, the sums' cotangents). W and b are split into their `a` and `mu` halves here, so
a tile does two (C, D) matmuls instead of lane-slicing at offset D. The backward pass is a
second kernel under `jax.custom_vjp`: it recomputes o from (h, W, b) (nothing of size
(B, N, 2D) is saved) and writes grads for h and x; weight and bias grads are per backend (see
`tpu` and `gpu`). The mask is a constant: no gradient flows to it (on the XLA path either).

Precision: matmuls take the promoted operand dtype (bf16 operands stay bf16, fp32 stays fp32)
with fp32 accumulation; the backward casts [ga | gmu] to that dtype before its matmuls.

Sampling direction (`guided_sample_step`): one token of a doubled batch [cond; uncond], STARFlow's
Gaussian-product classifier-free guidance, as one elementwise kernel.

Sharding: under a mesh with some of `batch_axes` (total size > 1 dividing B), the pallas path
runs inside `jax.shard_map` over those axes (h, x, the mask and the outputs split on batch; W, b
replicated), because a compiled Pallas kernel is an opaque custom call to the partitioner.

Kernels are run through a `run(kind, cfg, *args)` function, kind "fwd" / "bwd" / "sample":
`_on_platform` picks the body per platform; `testing` supplies one that forces a body.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

from pretzel_jax.kernels.flow_affine import gpu, support, tpu
from pretzel_jax.kernels.flow_affine.common import KernelCfg
from pretzel_jax.kernels.flow_affine.reference import (
    SOFTPLUS_ONE,
    affine_forward_reference,
    guided_sample_step_reference,
)
from pretzel_jax.kernels.flow_affine.support import IMPLS, is_supported

__all__ = [
    "IMPLS",
    "SOFTPLUS_ONE",
    "affine_forward",
    "affine_forward_reference",
    "guided_sample_step",
    "guided_sample_step_reference",
    "is_supported",
]


def _on_platform(kind: str, cfg: KernelCfg, *args):
    """Run kernel `kind` for the platform the computation is lowered for: the Mosaic body on
    TPU, the Triton body on GPU, the TPU body in the interpreter in interpret mode and on a
    platform with no Pallas compiler."""
    build = lambda backend, target: backend.BUILDERS[kind](cfg, target)
    if cfg.interpret:
        return build(tpu, "interpret")(*args)
    return jax.lax.platform_dependent(
        *args,
        tpu=build(tpu, "tpu"),
        cuda=build(gpu, "triton"),
        rocm=build(gpu, "triton"),
        default=build(tpu, "interpret"),
    )


# -- training direction -------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _affine_pallas(run, cfg: KernelCfg, h, wa, wmu, ba, bmu, x, mask):
    return tuple(run("fwd", cfg, h, wa, wmu, ba, bmu, x, mask))


def _affine_pallas_fwd(run, cfg: KernelCfg, h, wa, wmu, ba, bmu, x, mask):
    # Residuals are the inputs only: the backward kernel recomputes the head output.
    return _affine_pallas(run, cfg, h, wa, wmu, ba, bmu, x, mask), (h, wa, wmu, ba, bmu, x, mask)


def _affine_pallas_bwd(run, cfg: KernelCfg, res, cotangents):
    gz, gsls, gsz2 = cotangents
    grads = tuple(run("bwd", cfg, *res, gz, gsls, gsz2))
    mask = res[-1]
    return (*grads, None if mask is None else jnp.zeros_like(mask))  # the mask is a constant


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


def _affine_forward_pallas(
    h, w, b, x, mask, cfg: KernelCfg, batch_axes: tuple[str, ...], run=_on_platform
):
    """The kernel path; mask None or (B, N) fp32. run: see `_on_platform`."""
    d = x.shape[-1]
    args = (h, w[:, :d], w[:, d:], b[:d], b[d:], x) + (() if mask is None else (mask,))

    def fn(h, wa, wmu, ba, bmu, x, mask=None):
        return _affine_pallas(run, cfg, h, wa, wmu, ba, bmu, x, mask)

    mesh, axes = _batch_shard_axes(tuple(batch_axes), h.shape[0])
    if mesh is not None:
        P = jax.sharding.PartitionSpec
        batch, rep = P(axes), P()
        fn = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(batch, rep, rep, rep, rep, batch) + (() if mask is None else (batch,)),
            out_specs=(batch, batch, batch),
            check_vma=False,
        )
    return fn(*args)


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
    mask=None,
    per_position: bool = False,
    block_n: int | None = None,
    interpret: bool | None = None,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
):
    """Fused flow head: (z (B, N, D) fp32, sum_log_sigma fp32, sum_z2 fp32).

    h (B, N, C), w (C, 2D), b (2D,), x (B, N, D). impl: "xla" (reference) or "pallas" (kernel
    when `is_supported`, else the reference with a logged reason). mask (B, N) bool or float:
    positions where it is 0 contribute nothing to the sums (a float mask weights them); z is
    returned for every position; the mask gets no gradient. per_position: the sums are per
    position, (B, N) (over D only), instead of per row, (B,). interpret: None = interpret
    mode on a CPU backend; False = compile for the platform lowered for. Differentiable in
    h, w, b, x on both paths.
    """
    _check_impl(impl)
    chex.assert_rank([h, w, b, x], [3, 2, 1, 3])
    bsz, n, c = h.shape
    d = x.shape[-1]
    chex.assert_shape([w, b, x], [(c, 2 * d), (2 * d,), (bsz, n, d)])
    if mask is not None:
        chex.assert_shape(mask, (bsz, n))
        mask = jax.lax.stop_gradient(jnp.asarray(mask).astype(jnp.float32))
    kw = dict(soft_clip=soft_clip, use_softplus=use_softplus, mask=mask, per_position=per_position)
    if impl == "xla":
        return affine_forward_reference(h, w, b, x, **kw)
    interp = support.resolve_interpret(interpret)
    ok, reason = is_supported(
        impl, h, w, x, block_n=block_n, interpret=interp,
        masked=mask is not None, per_position=per_position,
    )  # fmt: skip
    if not ok:
        support.log_fallback_once(reason)
        return affine_forward_reference(h, w, b, x, **kw)
    cfg = KernelCfg(float(soft_clip), bool(use_softplus), block_n, interp, bool(per_position))
    return _affine_forward_pallas(h, w, b, x, mask, cfg, batch_axes)


# -- sampling direction -------------------------------------------------------------------------


def _guided_sample_pallas(a, mu, z, guidance, cfg: KernelCfg, run=_on_platform):
    bsz = z.shape[0]
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    a, mu, w = f32(a), f32(mu), f32(guidance).reshape(1, 1)
    return tuple(run("sample", cfg, a[:bsz], a[bsz:], mu[:bsz], mu[bsz:], f32(z), w))


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
    cfg = KernelCfg(0.0, bool(use_softplus), None, support.resolve_interpret(interpret))
    return _guided_sample_pallas(a, mu, z, guidance, cfg)
