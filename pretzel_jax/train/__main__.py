"""CLI: python -m pretzel_jax.train --config experiments/x.py[:arg] [--config.train.steps=100 ...]
[--run_dir runs/x]. Rerunning the same command resumes from the run dir's newest checkpoint."""

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
    args, rest = parser.parse_known_args(argv)
    overrides = cli_overrides(rest, parser.error)
    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; we parse our own arguments
    # force: an imported library already put a handler on the root logger. INFO only for ours:
    # Orbax logs every checkpoint step at INFO.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("pretzel_jax").setLevel(logging.INFO)
    if args.distributed:
        import jax

        jax.distributed.initialize()
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
