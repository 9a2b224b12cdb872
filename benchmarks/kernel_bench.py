"""Fused flow-affine kernel vs its XLA reference: forward and forward+backward.

    python benchmarks/kernel_bench.py [--shapes small|medium|large|all|B,N,C,D;...]
                                      [--repeats N] [--dtype bfloat16|float32] [--block-n N]

Prints a Markdown table of medians measured in this run. Every timed function is compiled
ahead of time (`jax.jit(f).lower(...).compile()`) and timed with `block_until_ready`.

- GB/s counts the bytes that must move. Forward: h, W, b, x read; z, sum_log_sigma, sum_z2
  written. Forward+backward adds the backward's reads (h, W, b, x and the z cotangent) and
  writes (grads of h, W, b, x).
- TFLOP/s counts the matmul only: 2*B*N*C*2D for the forward, 3x that for forward+backward.
- Roofline (only when the device kind is known): max(bytes / HBM bandwidth, flops / peak), with
  the peaks printed above the table.

On CPU the kernel runs in Pallas interpret mode: those timings say nothing about GPU or TPU
speed, so CPU runs are limited to the small shapes. Not used by the tests.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretzel_jax.kernels import flow_affine  # noqa: E402

# (B, N, C, D)
SHAPES = {
    "small": [(2, 64, 64, 8), (4, 128, 128, 16), (2, 256, 256, 64)],
    "medium": [(8, 1024, 768, 16), (16, 1024, 1024, 64), (8, 4096, 1536, 64)],
    "large": [(32, 2048, 2048, 32), (64, 1024, 3072, 64), (16, 4096, 3072, 64)],
}
# device-kind prefix -> (HBM bytes/s, dense bf16 FLOP/s, fp32 FLOP/s (non-tensor), tf32 FLOP/s)
PEAKS = {
    "NVIDIA H100": (3.35e12, 989e12, 67e12, 494e12),
    "NVIDIA H200": (4.8e12, 989e12, 67e12, 494e12),
}


def parse_shapes(spec: str) -> list[tuple[int, int, int, int]]:
    if spec == "all":
        return [s for v in SHAPES.values() for s in v]
    if spec in SHAPES:
        return SHAPES[spec]
    return [tuple(int(v) for v in item.split(",")) for item in spec.split(";") if item]


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def make_fns(impl: str, block_n: int | None):
    kw = dict(soft_clip=4.0, use_softplus=True, impl=impl, block_n=block_n)
    fwd = lambda h, w, b, x: flow_affine.affine_forward(h, w, b, x, **kw)

    def loss(h, w, b, x):
        z, sls, sz2 = fwd(h, w, b, x)
        return jnp.sum(z) + jnp.sum(sls) + jnp.sum(sz2)

    return fwd, jax.grad(loss, argnums=(0, 1, 2, 3))


def traffic(b, n, c, d, isz) -> tuple[int, int]:
    """(forward bytes, forward+backward bytes) that must move."""
    read = b * n * c * isz + c * 2 * d * isz + 2 * d * 4 + b * n * d * 4
    fwd = read + b * n * d * 4 + 2 * b * 4
    bwd = read + b * n * d * 4 + (b * n * c * isz + c * 2 * d * isz + 2 * d * 4 + b * n * d * 4)
    return fwd, fwd + bwd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help="small|medium|large|all or 'B,N,C,D;...'")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--block-n", type=int, default=None)
    args = p.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0]
    on_cpu = backend == "cpu"
    spec = args.shapes or ("small" if on_cpu else "all")
    shapes = parse_shapes(spec)
    if on_cpu and spec != "small":
        big = [s for s in shapes if s[0] * s[1] * s[2] > 2**18]
        if big:
            print(f"note: dropping shapes too large for CPU interpret mode: {big}")
            shapes = [s for s in shapes if s not in big]
    repeats = args.repeats or (3 if on_cpu else 20)
    dtype = jnp.dtype(args.dtype)

    print(
        f"jax {jax.__version__}, backend {backend}, device {device.device_kind!r}, "
        f"dtype {dtype.name}, repeats {repeats}, block_n {args.block_n or 'default'}"
    )
    if on_cpu:
        print(
            "note: CPU runs the Pallas kernel in interpret mode; these timings say nothing "
            "about GPU/TPU speed (the interpreter loops over the grid in HLO)."
        )
    peaks = next((v for k, v in PEAKS.items() if device.device_kind.startswith(k)), None)
    if peaks:
        bw, bf16, fp32, tf32 = peaks
        if dtype == jnp.bfloat16:
            mm_peak, what = bf16, "dense bf16"
        else:
            mm_peak, what = fp32, f"fp32 non-tensor-core (IEEE fp32 dot; tf32: {tf32 / 1e12:.0f})"
        print(
            f"roofline assumption: {device.device_kind}: HBM {bw / 1e12:.2f} TB/s, "
            f"matmul peak {mm_peak / 1e12:.0f} TFLOP/s {what}"
        )
    else:
        print(f"roofline: unknown device kind {device.device_kind!r}, no roofline columns")
    print()
    print(
        "| B | N | C | D | pass | impl | median ms | GB/s | TFLOP/s | pallas/ref "
        + ("| roofline ms | measured/roofline " if peaks else "")
        + "|"
    )
    print("|" + "---|" * (10 + (2 if peaks else 0)))

    for b, n, c, d in shapes:
        key = jax.random.split(jax.random.PRNGKey(0), 4)
        h = jax.random.normal(key[0], (b, n, c), jnp.float32).astype(dtype)
        w = (jax.random.normal(key[1], (c, 2 * d)) / math.sqrt(c)).astype(dtype)
        bias = jax.random.normal(key[2], (2 * d,)) * 0.1
        x = jax.random.normal(key[3], (b, n, d))
        ok, reason = flow_affine.is_supported("pallas", h, w, x, block_n=args.block_n)
        fwd_bytes, all_bytes = traffic(b, n, c, d, dtype.itemsize)
        flops = 2 * b * n * c * 2 * d
        ref_ms = {}
        for impl in ("xla", "pallas"):
            fwd, grad = make_fns(impl, args.block_n)
            for name, fn, nbytes, nflops in (
                ("fwd", fwd, fwd_bytes, flops),
                ("fwd+bwd", grad, all_bytes, 3 * flops),
            ):
                compiled = jax.jit(fn).lower(h, w, bias, x).compile()
                ms = median_ms(compiled, (h, w, bias, x), repeats)
                label = impl if impl == "xla" or ok else f"pallas (fallback: {reason})"
                ratio = "" if impl == "xla" else f"{ms / ref_ms[name]:.2f}"
                ref_ms.setdefault(name, ms)
                cells = [
                    b,
                    n,
                    c,
                    d,
                    name,
                    label,
                    f"{ms:.3f}",
                    f"{nbytes / ms / 1e6:.1f}",
                    f"{nflops / ms / 1e9:.3f}",
                    ratio,
                ]
                if peaks:
                    roof = max(nbytes / bw, nflops / mm_peak) * 1e3
                    cells += [f"{roof:.3f}", f"{ms / roof:.2f}"]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
