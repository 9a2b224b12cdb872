"""Builds registered data sets into a data dir, once, before training or evaluation.

python -m pretzel_jax.data.prepare --name digits --data_dir /path/to/data
python -m pretzel_jax.data.prepare --name shapes_vqa --name shapes_edits --data_dir D --workers 2

Names that are views of one data set (shapes_cells, shapes_images of shapes_captions) build it
once. `--workers N` builds up to N data sets at once, each in its own process (the shapes
builders are single-threaded).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
from collections.abc import Sequence

from pretzel_jax.data.pipeline import DATASETS, prepare_dataset


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--name", required=True, action="append", choices=sorted(DATASETS), help="data set name"
    )
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to build into")
    parser.add_argument("--workers", type=int, default=1, help="data sets built at once")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    # One build per preparer: views share their source's.
    first: dict = {}
    for name in args.name:
        first.setdefault(DATASETS[name], name)
    builds = list(first.values())
    if args.workers == 1 or len(builds) == 1:
        for name in builds:
            prepare_dataset(name, args.data_dir)
    else:
        spawn = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
            jobs = {name: pool.submit(prepare_dataset, name, args.data_dir) for name in builds}
            for name, job in jobs.items():
                try:
                    job.result()
                except Exception as e:
                    parser.exit(1, f"error: building {name} failed: {type(e).__name__}: {e}\n")
    print(f"{', '.join(args.name)} ready under {args.data_dir}")


if __name__ == "__main__":
    main()
