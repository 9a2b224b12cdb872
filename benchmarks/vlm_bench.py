"""VLM text-decoder generation speed: ours (JAX, jitted) vs transformers (torch CPU), same weights,
same machine, same run.

    python benchmarks/vlm_bench.py [--batches 1,8] [--prompt 128] [--new 32] [--repeats 5]
        [--hidden 512] [--layers 4] [--heads 8] [--kv-heads 2] [--vocab 32000]

A random Qwen2 config is built with transformers, saved as safetensors and imported with
`convert.hf_qwen25vl.load`, so both sides run identical fp32 weights; greedy, no early stop.
- ours, through `vlm.generate.generate` (host overhead included): prefill tokens/s =
  batch * prompt / t(generate 1 token); cached decode tokens/s = batch * (new - 1) /
  (t(generate `new`) - t(generate 1)) (prefill and per-call overhead cancel);
- transformers `generate`, measured the same way;
- transformers without `generate` (the leaner baseline): one forward over the prompt with
  `logits_to_keep=1`, then a Python loop of one-token forwards with `past_key_values`;
- each transformers variant at every `--torch-threads` count (default 1 and all CPUs: on a
  busy machine one thread can be several times faster than all); the fastest is the baseline.
Times are medians over `--repeats` runs after a warm-up (ours: compiled once per shape bucket
during warm-up); the variants alternate within each repeat so machine load hits all of them.
Prints a Markdown table; ratio = ours / the faster transformers variant (> 1: ours is faster).
Not used by the tests: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pretzel_jax.convert.hf_qwen25vl import load  # noqa: E402
from pretzel_jax.vlm.generate import generate  # noqa: E402


def hf_model(args) -> transformers.Qwen2ForCausalLM:
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).float().eval()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_manual(hf, ids, mask, new: int) -> tuple[float, float]:
    """transformers without `generate`: one forward over the prompt (logits of the last token
    only), then greedy steps with past_key_values. -> (prefill seconds, decode-loop seconds)."""
    t = time.perf_counter()
    out = hf(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t_prefill = time.perf_counter() - t
    past = out.past_key_values
    t = time.perf_counter()
    for _ in range(new - 1):
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        out = hf(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return t_prefill, time.perf_counter() - t


def bench(args, model, hf, batch: int) -> dict[str, tuple[float, str]]:
    """-> {"ours_prefill", "hf_prefill", "ours_decode", "hf_decode"}: (tokens/s, how); for
    transformers the fastest of {generate, manual loop} x torch thread counts."""
    rng = np.random.default_rng(batch)
    ids = rng.integers(3, args.vocab, (batch, args.prompt))
    ids_t, mask_t = torch.as_tensor(ids), torch.ones(batch, args.prompt, dtype=torch.long)
    threads = args.torch_threads

    def ours(n):
        return lambda: generate(model, ids, max_new_tokens=n, bucket=64).tokens

    def theirs(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        return lambda: hf.generate(input_ids=ids_t, attention_mask=mask_t, **kw)

    times: dict[str, list[float]] = {}

    def add(key, value):
        times.setdefault(key, []).append(value)

    with torch.inference_mode():
        for n in (1, args.new):  # warm-up: compiles ours, warms torch's allocator
            ours(n)()
            theirs(n)()
        hf_manual(hf, ids_t, mask_t, args.new)
        for _ in range(args.repeats):
            add("o1", timed(ours(1)))
            add("on", timed(ours(args.new)))
            for th in threads:
                torch.set_num_threads(th)
                add(f"g1/{th}", timed(theirs(1)))
                add(f"gn/{th}", timed(theirs(args.new)))
                prefill, loop = hf_manual(hf, ids_t, mask_t, args.new)
                add(f"mp/{th}", prefill)
                add(f"md/{th}", loop)
    med = {k: statistics.median(v) for k, v in times.items()}
    steps, prompt = batch * (args.new - 1), batch * args.prompt
    prefill = {f"generate, {th} thr": prompt / med[f"g1/{th}"] for th in threads}
    prefill |= {f"forward, {th} thr": prompt / med[f"mp/{th}"] for th in threads}
    decode = {
        f"generate, {th} thr": steps / max(med[f"gn/{th}"] - med[f"g1/{th}"], 1e-9)
        for th in threads
    }
    decode |= {f"loop, {th} thr": steps / med[f"md/{th}"] for th in threads}
    best_p, best_d = max(prefill, key=prefill.get), max(decode, key=decode.get)
    return {
        "ours_prefill": (prompt / med["o1"], ""),
        "ours_decode": (steps / max(med["on"] - med["o1"], 1e-9), ""),
        "hf_prefill": (prefill[best_p], best_p),
        "hf_decode": (decode[best_d], best_d),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--torch-threads",
        default=f"1,{os.cpu_count()}",
        help="torch thread counts to try (the fastest is reported)",
    )
    args = p.parse_args(argv)
    args.torch_threads = sorted({int(t) for t in args.torch_threads.split(",")})
    if args.new < 2:
        p.error("--new must be >= 2 (decode speed is measured from the steps after the first)")

    hf = hf_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        model = load(tmp)
    n_params = sum(p.numel() for p in hf.parameters())
    print(
        f"config: Qwen2 hidden {args.hidden}, {args.layers} layers, heads {args.heads}/"
        f"{args.kv_heads} kv, vocab {args.vocab} ({n_params / 1e6:.1f}M params, fp32); prompt "
        f"{args.prompt}, {args.new} new tokens, greedy, median of {args.repeats}"
    )
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"(threads tried: {args.torch_threads}), transformers {metadata.version('transformers')}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| batch | prefill tok/s: ours | transformers (best) | ratio "
        "| cached decode tok/s: ours | transformers (best) | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batches.split(",")):
        r = bench(args, model, hf, batch)
        (op, _), (hp, hp_how) = r["ours_prefill"], r["hf_prefill"]
        (od, _), (hd, hd_how) = r["ours_decode"], r["hf_decode"]
        print(
            f"| {batch} | {op:.0f} | {hp:.0f} ({hp_how}) | {op / hp:.2f} | {od:.0f} | "
            f"{hd:.0f} ({hd_how}) | {od / hd:.2f} |",
            flush=True,
        )
    print()
    print("ratio = ours / the fastest transformers variant (> 1: ours is faster).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
