"""Command line for model directories: ``python -m workers.models tiny DIR [--seed N] [--i2v]``.

``tiny`` writes a tiny Wan2.1 t2v model (with ``--i2v``, an image-to-video
model; see `workers.models.tiny`) and prints its path; it does nothing when
DIR already holds that model and refuses (exit status 2, one line on stderr) a
directory holding anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.models.loading import ModelDirError
from workers.models.tiny import build_tiny_model

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model_dir = build_tiny_model(Path(args.dir), seed=args.seed, i2v=args.i2v)
    except ModelDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(model_dir)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.models", description="Build model directories.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="write a tiny Wan2.1 t2v or i2v model with deterministic random weights")
    tiny.add_argument("dir", help="a new or empty directory (or one already holding this tiny model)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives identical files")
    tiny.add_argument("--i2v", action="store_true", help="an image-to-video model (Wan2.1-I2V layout) instead of t2v")
    return parser


if __name__ == "__main__":
    sys.exit(main())
