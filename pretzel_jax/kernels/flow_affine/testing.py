"""Test hooks for the flow-affine kernels; production code never imports this module.

`run_body(body)` is a kernel runner (the `run` argument of `ops`) that runs the "tpu" or
"triton" kernel body in interpret mode, whatever the platform, so both bodies are tested on a
CPU host. With `poison`, NaN-filled buffers are aliased to every kernel output first, so an
element a kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pretzel_jax.kernels.flow_affine import common, gpu, ops, tpu

BODIES = {"tpu": tpu, "triton": gpu}


def poisoned_pallas_call(kernel, *, in_specs, out_specs, out_shape, args, **kw):
    """`common.pallas_call` with NaN-filled buffers aliased to the outputs."""
    bufs = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
    n_in, n_out = len(args), len(out_shape)

    def dropping(*refs):  # drops the aliased input refs
        kernel(*refs[:n_in], *refs[n_in + n_out :])

    return common.pallas_call(
        dropping,
        in_specs=[*in_specs, *out_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        args=(*args, *bufs),
        aliases={n_in + i: i for i in range(n_out)},
        **kw,
    )


def _run_body(body: str, poison: bool, kind: str, cfg: common.KernelCfg, *args):
    call = poisoned_pallas_call if poison else common.pallas_call
    return BODIES[body].BUILDERS[kind](cfg, "interpret", call)(*args)


def run_body(body: str, *, poison: bool = True):
    """A runner for `ops`: kernel `body` ("tpu" / "triton") in interpret mode."""
    if body not in BODIES:
        raise ValueError(f"unknown body {body!r}: expected one of {tuple(BODIES)}")
    return functools.partial(_run_body, body, poison)


def affine_pallas(
    h,
    w,
    b,
    x,
    *,
    soft_clip: float,
    use_softplus: bool,
    body: str = "tpu",
    block_n: int | None = 16,
    mask=None,
    per_position: bool = False,
    batch_axes: tuple[str, ...] = (),
    poison: bool = True,
):
    """`affine_forward`'s kernel path (custom_vjp, shard_map) with a forced, interpreted body."""
    cfg = common.KernelCfg(float(soft_clip), bool(use_softplus), block_n, True, per_position)
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.float32)
    run = run_body(body, poison=poison)
    return ops._affine_forward_pallas(h, w, b, x, mask, cfg, batch_axes, run=run)


def guided_sample_pallas(a, mu, z, guidance, *, use_softplus: bool, body: str, poison=True):
    """`guided_sample_step`'s kernel path with a forced, interpreted body."""
    cfg = common.KernelCfg(0.0, bool(use_softplus), None, True)
    return ops._guided_sample_pallas(a, mu, z, guidance, cfg, run=run_body(body, poison=poison))
