"""Builds a registered data set into a data dir, once, before training or evaluation.

python -m pretzel_jax.data.prepare --name digits --data_dir /path/to/data
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pretzel_jax.data.pipeline import DATASETS, prepare_dataset


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, choices=sorted(DATASETS), help="data set name")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to build into")
    args = parser.parse_args(argv)
    prepare_dataset(args.name, args.data_dir)
    print(f"{args.name} is ready under {args.data_dir}")


if __name__ == "__main__":
    main()
