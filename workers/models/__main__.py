"""Command line for model directories: ``python -m workers.models tiny|build DIR ...``.

``tiny DIR [--seed N] [--i2v]`` writes a tiny Wan2.1 t2v model (with ``--i2v``,
an image-to-video model; see `workers.models.tiny`); ``build DIR --arch NAME
[--seed N]`` writes any architecture of `workers.models.presets` (production
shapes such as ``wan2.1-t2v-1.3b``, the ``bench`` preset). Both print the
directory's path; they do nothing when DIR already holds that model and refuse
(exit status 2, one line on stderr) a directory holding anything else.
``lora DIR [--rank R] [--seed N] [--layout diffusers|wan] [--model MODEL_DIR]``
writes a tiny random LoRA (`workers.models.tiny_lora`) and prints its file's path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.models.loading import ModelDirError
from workers.models.presets import ARCHS, build_arch_model
from workers.models.tiny import build_tiny_model
from workers.models.tiny_lora import LORA_LAYOUTS, build_tiny_lora

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tiny":
            model_dir = build_tiny_model(Path(args.dir), seed=args.seed, i2v=args.i2v)
        elif args.command == "lora":
            model = Path(args.model) if args.model else None
            model_dir = build_tiny_lora(
                Path(args.dir), model_dir=model, rank=args.rank, seed=args.seed, layout=args.layout
            )
        else:
            model_dir = build_arch_model(Path(args.dir), args.arch, seed=args.seed)
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
    build = commands.add_parser("build", help="write a model of a named architecture with deterministic random weights")
    build.add_argument("dir", help="a new or empty directory (or one already holding this model)")
    build.add_argument(
        "--arch",
        required=True,
        choices=list(ARCHS),
        help="; ".join(f"{arch.name}: {arch.summary}" for arch in ARCHS.values()),
    )
    build.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives identical files")
    lora = commands.add_parser("lora", help="write a tiny LoRA with random weights for a Wan DiT (tests, benchmarks)")
    lora.add_argument("dir", help="directory to write pytorch_lora_weights.safetensors into (created if missing)")
    lora.add_argument("--rank", type=int, default=4, help="the LoRA's rank")
    lora.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives identical files")
    lora.add_argument(
        "--layout", choices=LORA_LAYOUTS, default="diffusers", help="diffusers (PEFT keys) or wan (original)"
    )
    lora.add_argument(
        "--model", default=None, help="the model dir whose DiT it adapts (default: the tiny model's shape)"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
