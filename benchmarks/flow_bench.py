"""Flow micro-benchmarks: train step, sampling (with / without CFG), decode-step cost vs position,
block-Jacobi vs sequential sampling of a briefly trained toy model.

    python benchmarks/flow_bench.py [--sizes small,medium] [--repeats N] [--decode-repeats N]
    python benchmarks/flow_bench.py --jacobi [--jacobi-steps 400] [--jacobi-chunks 4,8,16]

Prints Markdown tables of medians (p10 / p90 alongside) measured in this one run. Every timed
function is compiled ahead of time (`jit(...).lower(...).compile()`), so a call can never
recompile; a trace counter per function double-checks that each was traced exactly once. Not
used by the tests: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
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

from pretzel_jax.flow import DeepShallowFlow, FlowConfig, jacobi_flow_inverse, nll_per_dim
from pretzel_jax.flow.image_flow import patchify
from pretzel_jax.nn import attention, rope_1d, rope_angles


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
DECODE_POSITIONS = (10, 500, 1000)
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


@contextlib.contextmanager
def whole_cache_attention():
    """Trace cached attention the old way, over every slot of the cache (the baseline)."""
    saved = attention.decode_block
    attention.decode_block = lambda size, largest=256: None
    try:
        yield
    finally:
        attention.decode_block = saved


def bench_decode(size: Size, repeats: int, warmup: int) -> dict:
    """One-token decode steps at each position, attending the filled blocks ("blocks") and the
    whole cache ("whole"), timed interleaved so drifts of the machine hit both alike."""
    cfg = size.flow_config()
    model = DeepShallowFlow(cfg, rngs=nnx.Rngs(0))
    stack = model.deep.layers  # the deep AF block's LayerStack
    layers = stack.num_layers
    graphdef, params = nnx.split(stack)
    params = params.to_pure_dict()
    b = size.sample_batch
    freqs, axis_of_pair = rope_1d(cfg.head_dim, cfg.rope_theta)

    # A full cache: random keys/values, every slot valid (the causal mask hides slots > pos).
    empty = stack.init_cache(b, DECODE_CACHE)
    kk, kv, kh = jax.random.split(jax.random.key(3), 3)
    full = empty.replace(
        k=jax.random.normal(kk, empty.k.shape, empty.k.dtype),
        v=jax.random.normal(kv, empty.v.shape, empty.v.dtype),
        kv_mask=jnp.ones_like(empty.kv_mask),
    )
    h = jax.random.normal(kh, (b, 1, cfg.width))

    def decode_step(params, h, cache, pos):
        cache = cache.at(jnp.full((layers,), pos, jnp.int32))
        rope = rope_angles(jnp.full((b, 1), pos, jnp.int32), freqs, axis_of_pair)
        return nnx.merge(graphdef, params)(h, rope=rope, cache=cache)

    positions = {p: jnp.asarray(p, jnp.int32) for p in DECODE_POSITIONS}
    first = positions[DECODE_POSITIONS[0]]
    steps, caches, compile_s, traces = {}, {}, {}, {}
    for name, ctx in (("blocks", contextlib.nullcontext), ("whole", whole_cache_attention)):
        caches[name] = jax.tree.map(jnp.copy, full)
        with ctx():  # the cache is donated and threaded through, as in a real decode loop
            steps[name], compile_s[name], traced = compile_once(
                decode_step, params, h, caches[name], first, donate=(2,)
            )
        traces[name] = traced
        # The output must depend on the position (the cache and pos are runtime arguments).
        outs = {}
        for p, pos in positions.items():
            (outs[p], caches[name]), _ = timed(steps[name], params, h, caches[name], pos)
        if bool(jnp.allclose(outs[DECODE_POSITIONS[0]], outs[DECODE_POSITIONS[-1]])):
            raise RuntimeError("decode output does not depend on the position")
        if int(caches[name].index[0]) != DECODE_POSITIONS[-1] + 1:
            raise RuntimeError(f"unexpected cache index {caches[name].index} after the step")

    times = {(n, p): [] for n in steps for p in positions}
    for i in range(warmup + repeats):
        for (name, p), ts in times.items():
            (_, caches[name]), dt = timed(steps[name], params, h, caches[name], positions[p])
            if i >= warmup:
                ts.append(dt)
    return dict(
        stats={key: Stats(t) for key, t in times.items()},
        compile_s=compile_s,
        traces={n: t.count for n, t in traces.items()},
        layers=layers,
        batch=b,
        cache_mib=sum(x.nbytes for x in jax.tree.leaves(full)) / 2**20,
    )


# -- 4. block-Jacobi vs sequential sampling -----------------------------------------------------

# A class-conditional toy flow on scikit-learn's bundled 8x8 digits (no download), upsampled to
# 16x16 and cut into 2x2 patches: N = 64 tokens of D = 4, like STARFlow's 4-channel latents.
JACOBI_CFG = FlowConfig(
    token_dim=4, width=64, head_dim=32, layers_per_block=(1, 1, 2), context_dim=10
)
JACOBI_TOL = 1e-3  # STARFlow's image sampler: block 16, threshold 1e-3, <= 32 iterations
JACOBI_CHUNK = 16
JACOBI_MAX_ITERS = 32
JACOBI_BATCH = 16
JACOBI_GUIDANCE = 1.0


def digits_tokens() -> tuple[np.ndarray, np.ndarray]:
    """(tokens (1797, 64, 4) in [-1, 1], labels (1797,)) from scikit-learn's digits."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    img = jnp.asarray(d.images, jnp.float32)[..., None] / 16.0  # (n, 8, 8, 1) in [0, 1]
    img = jax.image.resize(img, (img.shape[0], 16, 16, 1), "bilinear")
    return np.asarray(patchify(img * 2.0 - 1.0, 2)), d.target.astype(np.int32)


def train_toy_flow(steps: int, noise: str, batch: int = 32, seed: int = 0):
    """AdamW on the digits NLL with label dropout 0.1 and input noise `noise`: "deq" = uniform
    dequantisation over one of the 17 levels (sharp, as experiments/digits_flow.py), or a
    Gaussian std (STARFlow's noise augmentation). -> (graphdef, fresh params, trained params,
    (first, last) loss in nats/dim, seconds)."""
    tokens, labels = digits_tokens()
    model = DeepShallowFlow(JACOBI_CFG, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    fresh = jax.tree.map(jnp.copy, params)  # the training state below is donated
    if steps < 1:
        raise ValueError(f"--jacobi-steps must be >= 1, got {steps}")
    warmup = max(1, min(50, steps // 5))
    sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(steps, warmup + 1), 1e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
    state = (params, tx.init(params))
    data_x, data_y = jnp.asarray(tokens), jnp.asarray(labels)

    def step(state, key):
        params, opt_state = state
        ki, kn, kd = jax.random.split(key, 3)
        idx = jax.random.randint(ki, (batch,), 0, data_x.shape[0])
        x = data_x[idx]
        if noise == "deq":
            x = x + (2.0 / 16.0) * (jax.random.uniform(kn, x.shape) - 0.5)
        else:
            x = x + float(noise) * jax.random.normal(kn, x.shape)
        ctx = jax.nn.one_hot(data_y[idx], 10)[:, None, :]
        ctx = jnp.where(jax.random.uniform(kd, (batch, 1, 1)) < 0.1, 0.0, ctx)

        def loss_fn(params):
            z, logdet = nnx.merge(graphdef, params).forward(x, ctx)
            return jnp.mean(nll_per_dim(z, logdet))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=0)
    t0 = time.perf_counter()
    losses = []
    for key in jax.random.split(jax.random.key(seed + 1), steps):
        state, loss = step(state, key)
        losses.append(loss)
    losses = [float(v) for v in jax.device_get(losses)]
    if not np.isfinite(losses[-1]):
        raise RuntimeError(f"toy flow training diverged: loss {losses[-1]}")
    return graphdef, fresh, state[0], (losses[0], losses[-1]), time.perf_counter() - t0


def bench_jacobi(
    steps: int, noises: list[str], chunks: list[int], tols: list[float], repeats: int
) -> dict:
    models, trained_info = [], []
    graphdef = None
    for noise in noises:
        graphdef, fresh, params, losses, train_s = train_toy_flow(steps, noise)
        models.append((f"trained, noise {noise}", params))
        trained_info.append((noise, losses, train_s))
    models.append(("init (zero heads)", fresh))
    b, n = JACOBI_BATCH, 64
    z = jax.random.normal(jax.random.key(5), (b, n, JACOBI_CFG.token_dim))
    context = jax.nn.one_hot(jnp.arange(b) % 10, 10)[:, None, :]
    uncond = jnp.zeros_like(context)
    w = jnp.asarray(JACOBI_GUIDANCE, jnp.float32)

    def sequential(params, z, context, uncond, w):
        flow = nnx.merge(graphdef, params)
        if uncond is None:
            return flow.inverse(z, context)
        return flow.inverse(z, context, guidance=w, uncond_context=uncond)

    def jacobi(chunk, batch_reduce, window):
        def run(params, z, context, uncond, w, tol):
            return jacobi_flow_inverse(
                nnx.merge(graphdef, params), z, context, chunk=chunk, tol=tol,
                max_iters=JACOBI_MAX_ITERS, guidance=w, uncond_context=uncond,
                batch_reduce=batch_reduce, window=window,
            )  # fmt: skip

        return run

    def paired_times(seq_fn, seq_args, jac_fn, jac_args):
        """Interleaved calls, so slow drifts of a shared machine hit both alike."""
        for _ in range(2):  # warm-up
            x_seq, _ = timed(seq_fn, *seq_args)
            out, _ = timed(jac_fn, *jac_args)
        ts, tj = [], []
        for _ in range(repeats):
            ts.append(timed(seq_fn, *seq_args)[1])
            tj.append(timed(jac_fn, *jac_args)[1])
        return x_seq, Stats(ts), out, Stats(tj)

    # (chunk, tol, criterion, window) per trained model; the identity model converges at once:
    # one row.
    cases = [(c, t, "max", "chunks") for c in chunks for t in tols]
    cases += [(JACOBI_CHUNK, t, "max", "sliding") for t in tols]
    cases.append((JACOBI_CHUNK, JACOBI_TOL, "pooled", "chunks"))  # STARFlow's pooled criterion
    modes = {"no CFG": None, f"CFG {JACOBI_GUIDANCE:g}": uncond}
    params0 = models[0][1]
    seq_fns = {m: compile_once(sequential, params0, z, context, u, w) for m, u in modes.items()}
    tol0 = jnp.asarray(tols[0], jnp.float32)
    jac_fns = {
        (m, c, red, win): compile_once(jacobi(c, red, win), params0, z, context, u, w, tol0)
        for m, u in modes.items()
        for c, red, win in dict.fromkeys((c, red, win) for c, _, red, win in cases)
    }
    rows = []
    for state, params in models:
        for mode, u in modes.items():
            first = (JACOBI_CHUNK, JACOBI_TOL, "max", "chunks")
            todo = cases if state.startswith("trained") else [first]
            for chunk, tol, red, win in todo:
                tol_a = jnp.asarray(tol, jnp.float32)
                x_seq, seq_t, (x, st), jac_t = paired_times(
                    seq_fns[mode][0],
                    (params, z, context, u, w),
                    jac_fns[(mode, chunk, red, win)][0],
                    (params, z, context, u, w, tol_a),
                )
                if not bool(jnp.all(jnp.isfinite(x_seq)) & jnp.all(jnp.isfinite(x))):
                    raise RuntimeError(f"{state} {mode}: non-finite samples")
                rows.append(
                    dict(
                        state=state, mode=mode, chunk=chunk, tol=tol, reduce=red, window=win,
                        calls=np.asarray(st.model_calls)[::-1],  # sampling order: deep first
                        seq_calls=np.asarray(st.sequential_calls)[::-1],
                        iters=np.asarray(st.iterations)[::-1],
                        seq_ms=seq_t.median * 1e3, jac_ms=jac_t.median * 1e3,
                        diff=float(jnp.max(jnp.abs(x - x_seq))),
                        rel=float(jnp.linalg.norm(x - x_seq) / jnp.linalg.norm(x_seq)),
                    )
                )  # fmt: skip
    traces = [t.count for _, _, t in (*seq_fns.values(), *jac_fns.values())]
    return dict(rows=rows, trained=trained_info, steps=steps, traces=traces)


def print_jacobi(r: dict, repeats: int) -> None:
    cfg = JACOBI_CFG
    print(
        f"## 4. Block-Jacobi vs sequential sampling (toy digits flow: N = 64 tokens of D = "
        f"{cfg.token_dim}, width {cfg.width}, layers {cfg.layers_per_block}, batch "
        f"{JACOBI_BATCH}, max_iters {JACOBI_MAX_ITERS})\n"
    )
    for noise, (first, last), train_s in r["trained"]:
        print(
            f"- trained with noise {noise}: {r['steps']} AdamW steps (batch 32) in "
            f"{train_s:.1f} s, loss {first:.3f} -> {last:.3f} nats/dim"
        )
    print(
        "- model calls = transformer passes, per block in sampling order (deep, then shallow); "
        "sequential = one per token = N per block (N - 1 without SOS); the context prefill "
        '(one pass in both) is not counted. "init" = zero heads, the identity: converges at '
        "once, shown for contrast only"
    )
    print(
        "- criterion on the squared relative change |new - old|^2 / |new|^2 of a chunk (window "
        "`chunks`, STARFlow) or of each slot (`sliding`: the window moves past its settled "
        "leading slots): `max` = worst example (default), `pooled` = sums over the batch "
        "(STARFlow); wall ms = "
        f"median of {repeats} AOT-compiled calls, sequential and Jacobi interleaved; diff = "
        "Jacobi vs sequential sample from the same noise (data range [-1, 1])\n"
    )
    header = ["model", "mode", "window", "chunk", "tol", "criterion", "Jacobi calls / block"]
    header += [
        "total",
        "sequential",
        "fewer calls",
        "seq ms",
        "Jacobi ms",
        "speed-up",
        "max abs diff",
    ]
    header += ["rel L2 diff"]
    rows = []
    for x in r["rows"]:
        total, seq = int(x["calls"].sum()), int(x["seq_calls"].sum())
        rows.append(
            [
                x["state"], x["mode"], x["window"], str(x["chunk"]), f"{x['tol']:g}", x["reduce"],
                " / ".join(str(int(c)) for c in x["calls"]), str(total), str(seq),
                f"{seq / total:.2f}x", f"{x['seq_ms']:.1f}", f"{x['jac_ms']:.1f}",
                f"{x['seq_ms'] / x['jac_ms']:.2f}x", f"{x['diff']:.2e}", f"{x['rel']:.2e}",
            ]
        )  # fmt: skip
    print(table(header, rows) + "\n")
    for x in r["rows"]:
        key = (x["chunk"], x["tol"], x["reduce"], x["window"])
        if x["state"].startswith("trained") and key == (JACOBI_CHUNK, JACOBI_TOL, "max", "chunks"):
            per_block = "; ".join(" ".join(str(int(i)) for i in it) for it in x["iters"])
            print(
                f"- iterations per chunk, {x['state']}, {x['mode']}, chunk {JACOBI_CHUNK} "
                f"(deep; shallow; shallow): {per_block}"
            )
    print(f"- traces per compiled function: {sorted(set(r['traces']))} (1 = compiled once)\n")


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,medium", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per train/sample case")
    ap.add_argument("--decode-repeats", type=int, default=50, help="timed calls per position")
    ap.add_argument("--decode-size", default="medium", choices=sorted(SIZES))
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    ap.add_argument(
        "--jacobi", action="store_true", help="only the block-Jacobi section (default: all)"
    )
    ap.add_argument("--decode", action="store_true", help="only the decode section")
    ap.add_argument("--jacobi-steps", type=int, default=300, help="toy-model training steps")
    ap.add_argument(
        "--jacobi-noise",
        default="0.1",
        help="comma list, one trained toy model each: Gaussian noise-augmentation stds and/or "
        "'deq' (uniform dequantisation only)",
    )
    ap.add_argument("--jacobi-chunks", default="4,8,16", help="comma list of Jacobi chunk sizes")
    ap.add_argument("--jacobi-tols", default=f"{JACOBI_TOL:g},1e-5,1e-8", help="comma list of tols")
    ap.add_argument("--jacobi-repeats", type=int, default=7, help="timed calls per Jacobi case")
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

    if args.decode:
        print_decode(SIZES[args.decode_size], args)
        print(f"Total wall time: {time.perf_counter() - t_start:.1f} s")
        return
    if args.jacobi:
        run_jacobi(args)
        print(f"Total wall time: {time.perf_counter() - t_start:.1f} s")
        return

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
    print_decode(s, args)
    run_jacobi(args)
    print(f"Total wall time: {time.perf_counter() - t_start:.1f} s")


def print_decode(s: Size, args) -> None:
    r = bench_decode(s, args.decode_repeats, args.warmup)
    print(
        f"## 3. Decode step vs position (deep `LayerStack` of {s.name}: width {s.width}, "
        f"{r['layers']} layers; batch {r['batch']}; fixed KV cache {DECODE_CACHE} slots, "
        f"{r['cache_mib']:.0f} MiB, donated)\n"
    )
    st = r["stats"]
    rows = [
        [f"pos {p}", *st["blocks", p].ms(), st["whole", p].ms()[0]]
        + [f"{st['blocks', p].median / st['whole', p].median:.2f}"]
        for p in DECODE_POSITIONS
    ]
    block = attention.decode_block(DECODE_CACHE)
    head = ["position", f"filled {block}-slot blocks ms", "p10", "p90", "whole cache ms"]
    print(table([*head, "blocks / whole"], rows) + "\n")
    lo, hi = DECODE_POSITIONS[0], DECODE_POSITIONS[-1]
    grow = st["blocks", hi].median / st["blocks", lo].median
    need = st["blocks", hi].median / st["whole", hi].median
    verdict = "within" if need <= DECODE_TARGET else "OUTSIDE"
    print(f"- pos {hi} / pos {lo} (medians), filled blocks: **{grow:.2f}**")
    print(
        f"- pos {hi}, filled blocks / the whole {DECODE_CACHE}-slot cache (the attention work at "
        f"that length): **{need:.2f}**, {verdict} the {DECODE_TARGET}x target"
    )
    compiles = ", ".join(f"{n} {t:.1f} s" for n, t in r["compile_s"].items())
    print(f"- compile: {compiles}; traces per variant: {r['traces']}\n")


def run_jacobi(args) -> None:
    chunks = [int(c) for c in args.jacobi_chunks.split(",") if c.strip()]
    tols = [float(t) for t in args.jacobi_tols.split(",") if t.strip()]
    noises = [x.strip() for x in args.jacobi_noise.split(",") if x.strip()]
    r = bench_jacobi(args.jacobi_steps, noises, chunks, tols, args.jacobi_repeats)
    print_jacobi(r, args.jacobi_repeats)


if __name__ == "__main__":
    main()
