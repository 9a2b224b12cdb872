"""Flow micro-benchmarks: train step, sampling (with / without CFG), decode-step cost vs position.

    python benchmarks/flow_bench.py [--sizes small,medium] [--repeats N] [--decode-repeats N]

Prints Markdown tables of medians (p10 / p90 alongside) measured in this one run. Every timed
function is compiled ahead of time (`jit(...).lower(...).compile()`), so a call can never
recompile; a trace counter per function double-checks that each was traced exactly once. Not
used by the tests: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from collections.abc import Callable
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pretzel_jax.flow import DeepShallowFlow, FlowConfig, nll_per_dim
from pretzel_jax.nn import rope_1d, rope_angles


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    token_dim: int
    width: int
    head_dim: int
    layers: tuple[int, ...]
    tokens: int  # N: tokens per example
    batch: int  # train-step batch
    sample_batch: int  # batch of `inverse` (CFG doubles it internally)

    def flow_config(self, context_dim: int = 0) -> FlowConfig:
        return FlowConfig(
            token_dim=self.token_dim,
            width=self.width,
            head_dim=self.head_dim,
            layers_per_block=self.layers,
            context_dim=context_dim,
        )


SIZES = {
    "small": Size("small", 4, 64, 32, (1, 1, 2), tokens=16, batch=64, sample_batch=16),
    "medium": Size("medium", 16, 256, 64, (2, 2, 6), tokens=64, batch=16, sample_batch=8),
}
CONTEXT_DIM = 32  # feature size of the context prefix of the sampling benchmark
CONTEXT_LEN = 8  # its length in tokens
GUIDANCE = 2.0
DECODE_CACHE = 1040  # fixed KV-cache length of the decode benchmark
DECODE_POSITIONS = (10, 1000)
DECODE_TARGET = 1.5  # the design target: pos-1000 step within 1.5x of the pos-10 step


# -- timing helpers ---------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    times: list[float]  # seconds

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    def ms(self) -> list[str]:
        """[median, p10, p90] in milliseconds, as table cells."""
        p10, p50, p90 = np.percentile(np.asarray(self.times) * 1e3, [10, 50, 90])
        return [f"{p50:.2f}", f"{p10:.2f}", f"{p90:.2f}"]


class Traced:
    """Wraps a function to count how many times JAX traces it."""

    def __init__(self, fn: Callable):
        self.fn, self.count = fn, 0

    def __call__(self, *args):
        self.count += 1
        return self.fn(*args)


def compile_once(fn: Callable, *args, donate: tuple[int, ...] = ()):
    """AOT-compiles `fn` for these arguments: (compiled, seconds to lower+compile, trace counter).
    The compiled executable never recompiles; a shape/dtype mismatch would raise instead."""
    traced = Traced(fn)
    t0 = time.perf_counter()
    compiled = jax.jit(traced, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0, traced


def timed(fn: Callable, *args):
    """(result, seconds) of one call, waiting for every output to be ready."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- 1. train step ----------------------------------------------------------------------------


def bench_train(size: Size, repeats: int, warmup: int) -> dict:
    model = DeepShallowFlow(size.flow_config(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    tx = optax.adamw(1e-4, weight_decay=1e-4)
    state = (params, tx.init(params))
    x = jax.random.normal(jax.random.key(1), (size.batch, size.tokens, size.token_dim))

    def train_step(state, x):
        params, opt_state = state

        def loss_fn(params):
            z, logdet = nnx.merge(graphdef, params).forward(x)
            return jnp.mean(nll_per_dim(z, logdet))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step, compile_s, traced = compile_once(train_step, state, x, donate=(0,))
    for _ in range(warmup):
        (state, loss), _ = timed(step, state, x)
    times = []
    for _ in range(repeats):
        (state, loss), dt = timed(step, state, x)
        times.append(dt)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"{size.name}: non-finite loss {float(loss)}")
    return dict(
        stats=Stats(times), compile_s=compile_s, traces=traced.count, params=param_count(params)
    )


# -- 2. sampling ------------------------------------------------------------------------------


def bench_sample(size: Size, repeats: int, warmup: int) -> dict:
    model = DeepShallowFlow(size.flow_config(CONTEXT_DIM), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    b, n, d = size.sample_batch, size.tokens, size.token_dim
    keys = jax.random.split(jax.random.key(2), 2)
    z = jax.random.normal(keys[0], (b, n, d))
    context = jax.random.normal(keys[1], (b, CONTEXT_LEN, CONTEXT_DIM))
    uncond = jnp.zeros_like(context)

    def sample_plain(params, z, context):
        return nnx.merge(graphdef, params).inverse(z, context)

    def sample_cfg(params, z, context, uncond):
        return nnx.merge(graphdef, params).inverse(
            z, context, guidance=GUIDANCE, uncond_context=uncond
        )

    out = {}
    for mode, fn, args in (
        ("no CFG", sample_plain, (params, z, context)),
        (f"CFG {GUIDANCE:g}", sample_cfg, (params, z, context, uncond)),
    ):
        compiled, compile_s, traced = compile_once(fn, *args)
        for _ in range(warmup):
            x, _ = timed(compiled, *args)
        times = [timed(compiled, *args)[1] for _ in range(repeats)]
        if not bool(jnp.all(jnp.isfinite(x))):
            raise RuntimeError(f"{size.name} {mode}: non-finite samples")
        out[mode] = dict(stats=Stats(times), compile_s=compile_s, traces=traced.count)
    return out


# -- 3. decode step vs position ---------------------------------------------------------------


def bench_decode(size: Size, repeats: int, warmup: int) -> dict:
    cfg = size.flow_config()
    model = DeepShallowFlow(cfg, rngs=nnx.Rngs(0))
    stack = model.deep.layers  # the deep AF block's LayerStack
    layers = stack.num_layers
    graphdef, params = nnx.split(stack)
    params = params.to_pure_dict()
    b = size.sample_batch
    freqs, axis_of_pair = rope_1d(cfg.head_dim, cfg.rope_theta)

    # A full cache: random keys/values, every slot valid (the causal mask hides slots > pos).
    cache = stack.init_cache(b, DECODE_CACHE)
    kk, kv, kh = jax.random.split(jax.random.key(3), 3)
    cache = cache.replace(
        k=jax.random.normal(kk, cache.k.shape, cache.k.dtype),
        v=jax.random.normal(kv, cache.v.shape, cache.v.dtype),
        kv_mask=jnp.ones_like(cache.kv_mask),
    )
    h = jax.random.normal(kh, (b, 1, cfg.width))

    def decode_step(params, h, cache, pos):
        cache = cache.at(jnp.full((layers,), pos, jnp.int32))
        rope = rope_angles(jnp.full((b, 1), pos, jnp.int32), freqs, axis_of_pair)
        return nnx.merge(graphdef, params)(h, rope=rope, cache=cache)

    positions = {p: jnp.asarray(p, jnp.int32) for p in DECODE_POSITIONS}
    first = positions[DECODE_POSITIONS[0]]
    # The cache is donated and threaded through the calls, as in a real decode loop (in place).
    step, compile_s, traced = compile_once(decode_step, params, h, cache, first, donate=(2,))

    # The output must depend on the position (the cache and pos are runtime arguments).
    outs = {}
    for p, pos in positions.items():
        (outs[p], cache), _ = timed(step, params, h, cache, pos)
    a, c = (outs[p] for p in DECODE_POSITIONS)
    if bool(jnp.allclose(a, c)):
        raise RuntimeError("decode output does not depend on the position")
    if int(cache.index[0]) != DECODE_POSITIONS[-1] + 1:
        raise RuntimeError(f"unexpected cache index {cache.index} after the step")

    for _ in range(warmup):
        for pos in positions.values():
            (_, cache), _ = timed(step, params, h, cache, pos)
    times = {p: [] for p in positions}
    for _ in range(repeats):  # interleaved, so slow drifts of the machine hit both alike
        for p, pos in positions.items():
            (_, cache), dt = timed(step, params, h, cache, pos)
            times[p].append(dt)
    return dict(
        stats={p: Stats(t) for p, t in times.items()},
        compile_s=compile_s,
        traces=traced.count,
        layers=layers,
        batch=b,
        cache_mib=sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**20,
    )


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,medium", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per train/sample case")
    ap.add_argument("--decode-repeats", type=int, default=50, help="timed calls per position")
    ap.add_argument("--decode-size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    args = ap.parse_args(argv)
    sizes = [SIZES[s.strip()] for s in args.sizes.split(",") if s.strip()]
    t_start = time.perf_counter()

    print("# pretzel_jax flow benchmark\n")
    print(f"- command: `python {shlex.join(sys.argv)}`")
    dev = jax.devices()[0]
    print(f"- device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s))")
    versions = ", ".join(f"{m} {metadata.version(m)}" for m in ("jax", "jaxlib", "flax", "optax"))
    print(f"- {versions}")
    print(f"- repeats: {args.repeats} (train, sample), {args.decode_repeats} (decode)")
    print("- times in ms: median, p10, p90; throughputs and ratios from medians\n")

    print("## 1. Train step (value_and_grad of nll_per_dim + adamw, params donated)\n")
    rows, base = [], None
    for s in sizes:
        r = bench_train(s, args.repeats, args.warmup)
        med = r["stats"].median
        base = base or med
        rows.append(
            [
                s.name,
                f"{s.width}/{s.head_dim}/{s.layers}",
                f"{s.batch}x{s.tokens}x{s.token_dim}",
                f"{r['params']:,}",
                *r["stats"].ms(),
                f"{s.batch / med:,.0f}",
                f"{s.batch * s.tokens / med:,.0f}",
                f"{med / base:.2f}x",
                f"{r['compile_s']:.1f}",
                str(r["traces"]),
            ]
        )
    header = ["size", "width/head/layers", "B x N x D", "params", "step ms", "p10", "p90"]
    header += ["examples/s", "tokens/s", f"vs {sizes[0].name}", "compile s", "traces"]
    print(table(header, rows) + "\n")

    print(
        f"## 2. Sampling (`DeepShallowFlow.inverse`, context {CONTEXT_LEN}x{CONTEXT_DIM}, jitted)\n"
    )
    rows = []
    for s in sizes:
        r = bench_sample(s, args.repeats, args.warmup)
        plain = r["no CFG"]["stats"].median
        for mode, m in r.items():
            med = m["stats"].median
            rows.append(
                [
                    s.name,
                    mode,
                    f"{s.sample_batch}x{s.tokens}",
                    *m["stats"].ms(),
                    f"{s.sample_batch * s.tokens / med:,.0f}",
                    f"{med / plain:.2f}x",
                    f"{m['compile_s']:.1f}",
                    str(m["traces"]),
                ]
            )
    header = ["size", "mode", "B x N", "inverse ms", "p10", "p90", "sampled tokens/s"]
    header += ["vs no CFG", "compile s", "traces"]
    print(table(header, rows) + "\n")

    s = SIZES[args.decode_size]
    r = bench_decode(s, args.decode_repeats, args.warmup)
    print(
        f"## 3. Decode step vs position (deep `LayerStack` of {s.name}: width {s.width}, "
        f"{r['layers']} layers; batch {r['batch']}; fixed KV cache {DECODE_CACHE} slots, "
        f"{r['cache_mib']:.0f} MiB, donated)\n"
    )
    lo, hi = DECODE_POSITIONS
    rows = [[f"pos {p}", *st.ms()] for p, st in r["stats"].items()]
    print(table(["position", "one-token step ms", "p10", "p90"], rows) + "\n")
    ratio = r["stats"][hi].median / r["stats"][lo].median
    verdict = "within" if ratio <= DECODE_TARGET else "OUTSIDE"
    target = f"{verdict} the {DECODE_TARGET}x target"
    print(f"- ratio pos{hi}/pos{lo} (medians): **{ratio:.3f}**, {target}")
    print(f"- compile: {r['compile_s']:.1f} s, traced {r['traces']} time(s) for both positions\n")
    print(f"Total wall time: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
