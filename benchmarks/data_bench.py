"""Data pipeline throughput per curriculum stage vs what a toy training step consumes.

    python benchmarks/data_bench.py [--data_dir DIR] [--records 1000] [--workers 2]
        [--batch 8] [--seq_len 512] [--batches 40] [--repeats 5] [--warmup 10]

- Builds (once, cached in --data_dir) the four shapes configs with --records train records each.
- Per stage (1: text-to-image, 2: captioning + VQA, 3: the weighted mixture), runs
  `make_stage_iterator` with --workers worker processes; after a warm-up (worker start-up and the
  first batches, not timed) it times --repeats runs of --batches batches and reports the median
  rates: documents/s (examples) and packed sequences/s, plus the token fill (non-padding share).
- Times a toy training step: `vlm.model.Qwen25VL` text decoder with 4 layers, hidden 128, the
  shapes vocabulary, on one stage-3 batch of (--batch, --seq_len): value_and_grad of the masked
  next-token loss + an optax adamw update, jitted and compiled ahead of time; median of
  --repeats steps. The real Pretzel step (VLM + flow + FAE) costs more, so the ratio is a floor.
- ratio = sequences/s delivered / sequences/s the toy step consumes (target: stage 3 >= 5).

The pipeline and the step are timed apart, each with the whole machine. Prints Markdown tables.
Not used by the tests: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time
from importlib import metadata

import absl.flags

# Grain's worker processes read absl flags; outside absl.app.run they are unparsed.
absl.flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from pretzel_jax.data import pipeline  # noqa: E402
from pretzel_jax.data.shapes import builder  # noqa: E402
from pretzel_jax.vlm.config import VLMConfig  # noqa: E402
from pretzel_jax.vlm.model import Qwen25VL  # noqa: E402
from pretzel_jax.vlm.text import TextConfig  # noqa: E402

CONFIGS = {"caption": "captions", "vqa": "vqa", "interleaved": "interleaved", "edit": "edits"}


def prepare(data_dir: str, records: int) -> dict[str, str]:
    """Builds the bench configs (if missing); returns config.data.datasets for them."""
    datasets = {}
    for task, name in CONFIGS.items():
        config = builder.ShapesConfig(
            name=f"{name}_bench{records}",
            task=task,
            num_train=records,
            num_validation=4,
            num_test=4,
            num_heldout=4,
        )
        start = time.perf_counter()
        builder.prepare(data_dir, config)
        took = time.perf_counter() - start
        if took > 1:
            print(f"built shapes/{config.name} ({records} train records) in {took:.0f} s")
        datasets[task] = f"{builder.NAME}/{config.name}"
    return datasets


def bench_stage(cfg, batches: int, repeats: int, warmup: int) -> dict:
    it = pipeline.make_stage_iterator(cfg, "train")
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            batch = next(it)
        startup = time.perf_counter() - start
        docs_rate, seq_rate, fill = [], [], []
        for _ in range(repeats):
            docs = 0
            start = time.perf_counter()
            for _ in range(batches):
                batch = next(it)
                docs += int(batch["segment_ids"].max(axis=1).sum())
                fill.append(float((batch["segment_ids"] > 0).mean()))
            dt = time.perf_counter() - start
            docs_rate.append(docs / dt)
            seq_rate.append(batches * len(batch["tokens"]) / dt)
    finally:
        del it  # stop the workers now
        gc.collect()
    return dict(
        docs=statistics.median(docs_rate),
        seqs=statistics.median(seq_rate),
        fill=statistics.mean(fill),
        startup=startup,
        last=batch,
    )


def toy_vlm(vocab: int) -> Qwen25VL:
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 6, 6),  # sums to head_dim / 2 = 16
    )
    return Qwen25VL(VLMConfig(text=text, vision=None), rngs=nnx.Rngs(0))


def bench_train_step(batch: dict, vocab: int, repeats: int, warmup: int) -> dict:
    graphdef, params = nnx.split(toy_vlm(vocab))
    params = params.to_pure_dict()
    tx = optax.adamw(1e-4, weight_decay=1e-4)
    state = (params, tx.init(params))
    inputs = {
        k: jnp.asarray(batch[k])
        for k in ("tokens", "targets", "text_loss_mask", "positions", "segment_ids")
    }

    def train_step(state, inputs):
        params, opt_state = state

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            hidden, _ = model.forward(
                model.embed(inputs["tokens"]),
                inputs["positions"],
                kv_mask=inputs["segment_ids"] > 0,
            )
            logits = model.logits(hidden)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, inputs["targets"])
            mask = inputs["text_loss_mask"]
            return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=(0,)).lower(state, inputs).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        state, loss = step(state, inputs)
        loss = float(loss)  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not np.isfinite(loss):
        raise RuntimeError(f"toy train step: non-finite loss {loss}")
    params_n = sum(x.size for x in jax.tree.leaves(state[0]))
    return dict(step=statistics.median(times), compile_s=compile_s, params=params_n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/tmp/pretzel_data_bench")
    parser.add_argument("--records", type=int, default=1000, help="train records per task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=40, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches / steps first")
    args = parser.parse_args(argv)

    datasets = prepare(args.data_dir, args.records)
    rows = {}
    for stage in (1, 2, 3):
        cfg = pipeline.stage_config(
            stage,
            data_dir=args.data_dir,
            datasets=datasets,
            batch_size=args.batch,
            seq_len=args.seq_len,
            num_workers=args.workers,
        )
        rows[stage] = bench_stage(cfg, args.batches, args.repeats, args.warmup)
    vocab = pipeline.make_layout(cfg).tokenizer.get_vocab_size()
    train = bench_train_step(rows[3]["last"], vocab, args.repeats, args.warmup)
    consumed = args.batch / train["step"]

    print(f"\n`python benchmarks/data_bench.py {shlex.join(sys.argv[1:])}`\n")
    print(
        f"- machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
        f"jax {jax.__version__} ({jax.default_backend()}), grain {metadata.version('grain')}"
    )
    print(
        f"- pipelines: {args.workers} worker processes, batch {args.batch} x seq_len "
        f"{args.seq_len}, latent grid 8x8 (66-token image slots), {args.records} train records "
        f"per task; medians of {args.repeats} runs of {args.batches} batches after "
        f"{args.warmup} warm-up batches"
    )
    print(
        f"- toy train step: Qwen25VL text decoder 4 layers x 128, vocab {vocab}, "
        f"{train['params'] / 1e6:.2f} M params, adamw; median {train['step'] * 1e3:.0f} ms/step "
        f"over {args.repeats} steps (compile {train['compile_s']:.1f} s) -> consumes "
        f"{consumed:.1f} sequences/s\n"
    )
    names = {1: "1 text-to-image", 2: "2 captioning + VQA", 3: "3 mixture"}
    print(
        "| stage | examples/s | packed sequences/s | token fill | start-up s "
        "| toy step consumes seq/s | delivered / consumed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage, r in rows.items():
        print(
            f"| {names[stage]} | {r['docs']:.0f} | {r['seqs']:.1f} | {r['fill']:.0%} | "
            f"{r['startup']:.1f} | {consumed:.1f} | {r['seqs'] / consumed:.1f}x |"
        )


if __name__ == "__main__":  # worker processes are spawned: they re-import this module
    main()
