"""CLI: python -m pretzel_jax.train --config experiments/x.py[:arg] [--config.train.steps=100 ...]
[--run_dir runs/x]. Rerunning the same command resumes from the run dir's newest checkpoint.

Multi-host: `--distributed` calls `jax.distributed.initialize()` first, which finds the cluster
itself on Cloud TPU, SLURM and GKE (JobSet). Elsewhere (e.g. several processes on one machine)
give it `--coordinator_address host:port --num_processes N --process_id i` as well. Every
process runs the same command with the same (shared) run dir."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from pretzel_jax.train.config import cli_overrides, load_config
from pretzel_jax.train.errors import CheckpointError, ConfigError, NonFiniteError
from pretzel_jax.train.loop import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretzel_jax.train", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. experiments/x.py")
    parser.add_argument("--run_dir", help="default: config.run_dir, else runs/<experiment>")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host TPU/GPU clusters)",
    )
    cluster = parser.add_argument_group(
        "explicit cluster (with --distributed, where it is not detected from the environment)"
    )
    cluster.add_argument("--coordinator_address", help="host:port of process 0's coordinator")
    cluster.add_argument("--num_processes", type=int, help="how many processes in all")
    cluster.add_argument("--process_id", type=int, help="this process's index, 0..N-1")
    args, rest = parser.parse_known_args(argv)
    overrides = cli_overrides(rest, parser.error)
    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; we parse our own arguments
    # force: an imported library already put a handler on the root logger. INFO only for ours:
    # Orbax logs every checkpoint step at INFO.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("pretzel_jax").setLevel(logging.INFO)
    explicit = {
        name: getattr(args, name)
        for name in ("coordinator_address", "num_processes", "process_id")
        if getattr(args, name) is not None
    }
    if explicit and not args.distributed:
        parser.error(f"--{next(iter(explicit))} needs --distributed")
    if args.distributed:
        import jax

        jax.distributed.initialize(**explicit)  # no arguments: detected from the cluster
    try:
        config = load_config(args.config, overrides=overrides)
        default_dir = Path("runs") / Path(args.config.split(".py:")[0]).stem
        run_dir = Path(args.run_dir or config.run_dir or default_dir)
        result = train(config, run_dir)
    except (ConfigError, CheckpointError, NonFiniteError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _summary(run_dir, result)
    return 0


def _summary(run_dir: Path, result: dict) -> None:
    """Where the run's outputs are and its headline numbers (the last log line is not them)."""
    if result.get("preempted"):
        print(f"stopped at step {result['step']} (preempted); rerun the command to resume")
        return
    files = sorted(
        p.name for p in run_dir.glob("*") if p.suffix in (".json", ".png", ".safetensors")
    )
    print(f"done at step {result['step']}: {run_dir} holds {', '.join(files)}")
    numbers = {k: v for k, v in result.items() if isinstance(v, float)}
    if numbers:
        print("  " + ", ".join(f"{k}={v:.4g}" for k, v in list(numbers.items())[:8]))


if __name__ == "__main__":
    sys.exit(main())
