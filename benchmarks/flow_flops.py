"""Flow train-step FLOP/s against this machine's measured fp32 matmul peak, same run.

    python benchmarks/flow_flops.py [--width 256] [--layers 2,2,8] [--grid 16] [--batch 8]
        [--repeats 7]

The model is the peer benchmark's (`../shared/bench/peer_flow`: ml-starflow's constructor
options through `convert.starflow.config_from_constructor`, 4-channel latents of grid x grid,
no text). Peak = the best median of a jitted fp32 `a @ b` at 1024, 2048 and 4096 squared.
Step FLOPs = XLA's `cost_analysis` of the unrolled program (a scan body is counted once), next
to an analytic count (6 x matmul weights x tokens, plus causal attention's QK and PV products
forward and backward over the lower triangle). The scanned and the unrolled stack alternate step
by step (value_and_grad of the bits/dim loss and AdamW, state donated). Not used by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pretzel_jax.convert.starflow import config_from_constructor
from pretzel_jax.flow import nll_per_dim
from pretzel_jax.flow.latent_flow import LatentFlow

# ml-starflow Model(...) options of the peer benchmark (its proto.BASE), no text prefix.
STARFLOW_OPTIONS = dict(
    in_channels=4,
    patch_size=1,
    num_blocks=3,
    head_dim=64,
    rope=True,
    sos=True,
    use_softplus=True,
    use_final_norm=True,
    soft_clip=4.0,
    seq_order="L2R",
    norm_type="layer_norm",
    txt_size=0,
    txt_dim=0,
    cond_top_only=False,
)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(repeats: int) -> tuple[float, int]:
    """-> (best GFLOP/s, at size n) of a jitted fp32 n x n matmul."""
    best = (0.0, 0)
    for n in (1024, 2048, 4096):
        a = jax.random.normal(jax.random.key(n), (n, n))
        f = jax.jit(jnp.matmul).lower(a, a).compile()
        best = max(best, (2 * n**3 / median_seconds(lambda f=f, a=a: f(a, a), repeats) / 1e9, n))
    return best


def analytic_flops(cfg, tokens: int, batch: int) -> float:
    """6 x (matmul weights) x tokens + causal attention (QK^T and PV, x3 for the backward)."""
    flow = cfg.flow
    width, layers = flow.width, sum(flow.layers_per_block)
    mlp = flow.transformer.mlp_hidden
    per_layer = 4 * width * width + 2 * width * mlp  # q, k, v, o; MLP in and out
    dense = 6 * batch * tokens * layers * per_layer
    attention = 3 * 2 * 2 * batch * layers * width * tokens * (tokens + 1) / 2
    return dense + attention


def train_program(cfg, x, unroll: bool):
    cfg = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, unroll_layers=unroll))
    graphdef, state = nnx.split(LatentFlow(cfg, rngs=nnx.Rngs(0)))
    params = state.to_pure_dict()
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)

    def step(train_state, x):
        p, opt = train_state

        def loss_fn(p):
            out = nnx.merge(graphdef, p).forward_all(x, None)
            return jnp.mean(nll_per_dim(out.z, out.logdet))

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    train_state = (params, tx.init(params))
    compiled = jax.jit(step, donate_argnums=0).lower(train_state, x).compile()
    return compiled, train_state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", default="2,2,8")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    layers = [int(v) for v in args.layers.split(",")]
    options = dict(
        STARFLOW_OPTIONS, channels=args.width, layers_per_block=layers, img_size=args.grid
    )
    cfg = config_from_constructor(options)
    tokens = args.grid * args.grid
    x = jax.random.normal(jax.random.key(1), (args.batch, args.grid, args.grid, 4))

    load = os.getloadavg()[0]
    peak, peak_n = matmul_peak(args.repeats)
    runs = {
        name: train_program(cfg, x, unroll) for name, unroll in (("scan", False), ("unroll", True))
    }
    xla_flops = runs["unroll"][0].cost_analysis()["flops"]
    flops = analytic_flops(cfg, tokens, args.batch)
    states = {name: state for name, (_, state) in runs.items()}
    times = {name: [] for name in runs}
    for name, (step, _) in runs.items():  # one step each after the compile
        states[name], loss = step(states[name], x)
        jax.block_until_ready(loss)
    for _ in range(args.repeats):
        for name, (step, _) in runs.items():
            t = time.perf_counter()
            states[name], loss = step(states[name], x)
            jax.block_until_ready(loss)
            times[name].append(time.perf_counter() - t)

    print(
        f"flow width {args.width}, layers {layers}, {tokens} tokens x batch {args.batch}; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs, load "
        f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; medians of "
        f"{args.repeats}"
    )
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s (n = {peak_n})")
    print(f"step FLOPs: XLA (unrolled) {xla_flops / 1e9:.1f} G, analytic {flops / 1e9:.1f} G\n")
    print(
        "| stack | median step s | GFLOP/s (XLA count) | of peak | GFLOP/s (analytic) | of peak |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        xr, ar = xla_flops / m / 1e9, flops / m / 1e9
        print(
            f"| {name} | {m:.3f} | {xr:.0f} | {100 * xr / peak:.0f}% | {ar:.0f} "
            f"| {100 * ar / peak:.0f}% |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
