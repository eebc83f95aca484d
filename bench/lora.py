"""``python -m bench.lora``: what a per-job LoRA costs a transform worker, and what a few-step job saves, in one run.

1. Switch cost per job, three ways of getting a job's adapter onto the resident DiT:
   ``cached`` (already in the worker's LRU: ``set_adapters`` on entry, ``disable_lora`` on exit),
   ``first use`` (parse the safetensors bytes, convert, inject the PEFT layers, then the same switch;
   the fetch from the bucket is not included), ``DiT reload`` (what a farm without adapters would do:
   load the transformer from disk again). Medians of ``--repeats`` interleaved rounds.
2. One DiT call with an active LoRA against the base DiT (the per-step price of the low-rank update).
3. Videos per minute end to end in one process (text encode, denoise, streaming VAE decode) of a
   4-step guidance-free job (guidance 1.0: one DiT call per step, no negative prompt encoded) against a
   40-step guided job (CFG 5, one-pass guidance as the farm's default), interleaved, and their ratio.

The model is ``--model-dir`` or the ``bench`` preset (DiT-bound on a CPU) built to a temporary dir;
the LoRA is a tiny random one of ``--rank`` shaped for its DiT (`workers.models.tiny_lora`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a Wan2.1 t2v model dir (instead of building the bench preset)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--slow-steps", type=int, default=40)
    parser.add_argument("--video-repeats", type=int, default=1, help="timed videos per kind (median reported)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--quick", action="store_true", help="tiny steps and one repeat: checks the bench runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.fast_steps, args.slow_steps, args.video_repeats = 1, 1, 2, 1
    return args


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(args: argparse.Namespace, model_dir: Path, lora_path: Path) -> dict[str, Any]:
    from workers.models.presets import arch_named
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.encode import TextEncodeStage
    from workers.stages.lora_adapters import AdapterChoice, LoraAdapters
    from workers.stages.transform import DenoiseStage, call_dit

    job = dict(arch_named("bench").job)
    size: dict[str, Any] = {"height": job["height"], "width": job["width"], "num_frames": job["frames"]}
    data = lora_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    stage = DenoiseStage(model_dir, one_pass_guidance=True)
    adapters = LoraAdapters(stage.transformer, capacity=args.repeats + 2)
    cached = AdapterChoice("cached", digest, 1.0)
    adapters.ensure_loaded(cached, data)

    def switch(choice: AdapterChoice) -> None:
        with adapters.activated([choice]):
            pass

    def first_use(choice: AdapterChoice) -> None:
        adapters.ensure_loaded(choice, data)
        switch(choice)

    switch_seconds: dict[str, list[float]] = {"cached": [], "first use": [], "DiT reload": []}
    for round_index in range(args.repeats):
        switch_seconds["cached"].append(timed(lambda: switch(cached)))
        fresh = AdapterChoice(f"fresh{round_index}", digest, 1.0)
        switch_seconds["first use"].append(timed(functools.partial(first_use, fresh)))
        switch_seconds["DiT reload"].append(timed(lambda: DenoiseStage(model_dir)))

    # The per-call price of an active adapter: the same DiT input with and without it.
    latents = stage.initial_latents(seed=0, **size)
    text = torch.randn(2, 512, int(stage.transformer.config["text_dim"]))
    timestep = torch.tensor([500.0, 500.0])
    batch = torch.cat([latents, latents])
    call_seconds: dict[str, list[float]] = {"base DiT call": [], "DiT call with the LoRA": []}
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            call_seconds["base DiT call"].append(
                timed(lambda: call_dit(stage.transformer, batch, timestep, text, None))
            )
            with adapters.activated([cached]):
                call_seconds["DiT call with the LoRA"].append(
                    timed(lambda: call_dit(stage.transformer, batch, timestep, text, None))
                )

    encoder = TextEncodeStage(model_dir)
    decoder = StreamingVaeDecoder(model_dir)
    kinds = {
        f"{args.fast_steps}-step guidance-free": (args.fast_steps, 1.0),
        f"{args.slow_steps}-step guided (CFG 5)": (args.slow_steps, 5.0),
    }

    def video(steps: int, guidance: float, seed: int) -> None:
        embeds = encoder.encode("a red fox running through snow", "blurry", guidance)
        out = stage.denoise(
            embeds, **size, num_inference_steps=steps, guidance_scale=guidance, seed=seed, flow_shift=None
        )
        for _ in decoder.iter_frames(out):
            pass

    video_seconds: dict[str, list[float]] = {name: [] for name in kinds}
    for seed in range(args.video_repeats):
        for name, (steps, guidance) in kinds.items():
            video_seconds[name].append(timed(functools.partial(video, steps, guidance, seed)))
    per_min = {name: 60.0 / statistics.median(values) for name, values in video_seconds.items()}
    fast, slow = list(per_min.values())
    return {
        "model_dir": str(model_dir),
        "lora": {"rank": args.rank, "bytes": len(data)},
        "job": {**size},
        "torch_threads": torch.get_num_threads(),
        "switch_ms": {name: 1000 * statistics.median(values) for name, values in switch_seconds.items()},
        "dit_call_ms": {name: 1000 * statistics.median(values[1:] or values) for name, values in call_seconds.items()},
        "videos_per_min": per_min,
        "few_step_ratio": fast / slow,
    }


def render(report: dict[str, Any]) -> str:
    job = report["job"]
    lines = [
        f"LoRA switching and few-step jobs ({report['model_dir']}), {job['width']}x{job['height']}, "
        f"{job['num_frames']} frames, rank-{report['lora']['rank']} LoRA of {report['lora']['bytes']} bytes, "
        f"{report['torch_threads']} threads",
        "",
        "| adapter onto the resident DiT, per job | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.1f} |" for name, ms in report["switch_ms"].items()),
        "",
        "| one DiT call (CFG batch of 2) | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.1f} |" for name, ms in report["dit_call_ms"].items()),
        "",
        "| video, end to end in one process | videos/min |",
        "|---|---|",
        *(f"| {name} | {per_min:.2f} |" for name, per_min in report["videos_per_min"].items()),
        "",
        f"few-step guidance-free over guided: {report['few_step_ratio']:.1f}x the videos per minute.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from workers.models.presets import build_arch_model
    from workers.models.tiny_lora import build_tiny_lora

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-lora-") as tmp:
        model_dir = args.model_dir or build_arch_model(Path(tmp) / "bench", "bench")
        lora_path = build_tiny_lora(Path(tmp) / "lora", model_dir=model_dir, rank=args.rank)
        report = run(args, model_dir, lora_path)
    text = render(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        text += f"\n(figures in {args.json})"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
