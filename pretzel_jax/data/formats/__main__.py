"""Builds a data set from your own files in one of the real formats.

python -m pretzel_jax.data.formats webdataset --src /data/shards --data_dir /data/tfds --name cc3m
python -m pretzel_jax.data.formats llava --src /data/llava.json --image_root /data/images \\
    --data_dir /data/tfds --name llava665k
(--src validation=/data/val.json adds a split; a bare path is split "train".)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pretzel_jax.data.formats import BUILDER_NAMES, FORMATS, BadRecordsError
from pretzel_jax.data.formats.common import DEFAULT_MAX_BAD_FRACTION, DEFAULT_NUM_THREADS


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", required=True)
    for fmt in FORMATS:
        sub = formats.add_parser(fmt)
        sub.add_argument(
            "--src",
            action="append",
            required=True,
            help="a source file or folder (split train), or SPLIT=PATH; repeat for more splits",
        )
        sub.add_argument("--data_dir", required=True, help="TFDS data dir to build into")
        sub.add_argument("--name", default="default", help="data set name (lowercase, digits, _)")
        sub.add_argument("--max_side", type=int, default=None, help="resize longer image sides")
        sub.add_argument(
            "--max_bad_fraction",
            type=float,
            default=DEFAULT_MAX_BAD_FRACTION,
            help="fraction of bad entries per split that may be skipped; more stops the build",
        )
        sub.add_argument("--num_threads", type=int, default=DEFAULT_NUM_THREADS)
        if fmt == "webdataset":
            sub.add_argument("--caption_field", default="caption", help=".json caption field")
        else:
            sub.add_argument("--image_root", default=None, help="folder image paths start from")
    args = vars(parser.parse_args(argv))
    fmt = args.pop("format")
    args["src"] = _sources(args["src"], parser)
    try:
        reports = FORMATS[fmt](**args)
    except (BadRecordsError, FileNotFoundError, ValueError) as e:
        # Bad sources, names and knobs: their messages name the thing and the fix.
        sys.exit(f"error: {e}")
    for split, report in reports.items():
        print(
            f"{split}: {report.written} of {report.total} written, skipped "
            f"{dict(sorted(report.skipped.items())) or 0} (source {report.source})"
        )
    print(f"{BUILDER_NAMES[fmt]}/{args['name']} is ready under {args['data_dir']}")


def _sources(values: list[str], parser: argparse.ArgumentParser) -> str | dict[str, str]:
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    sources = {}
    for value in values:
        split, sep, path = value.partition("=")
        if not sep or not split or split in sources:
            parser.error(f"--src {value!r}: with several splits give each as SPLIT=PATH, once.")
        sources[split] = path
    return sources


if __name__ == "__main__":
    main()
