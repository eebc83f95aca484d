"""``python -m bench.dit``: the transform stage's speed options against diffusers' WanPipeline, in one run.

Every row denoises the same jobs (random text embeddings, one seed per job, guidance on) with the
same resident DiT weights:

- ``WanPipeline`` -- diffusers' own loop (``output_type="latent"``, embeddings passed in): the baseline;
- ``stage, two-pass`` -- the farm's loop with every option off (it equals WanPipeline bit for bit);
- ``one-pass guidance`` -- cond and uncond as one batch of 2 per step (``transform.one_pass_guidance``);
- ``cache first_block t=X`` -- a job's ``cache`` (diffusers' FirstBlockCache), for each threshold;
- ``compiled`` -- ``transform.compile`` (torch.compile of the DiT blocks; compile time reported apart);
- ``attention B`` -- ``transform.attention_backend`` for each ``--attention`` name;
- ``best`` -- one-pass guidance + the largest cache threshold (and the same on compiled blocks);
- ``farm batch of B`` -- ``transform.batch_size``: B jobs, each denoising in its own thread as the
  worker runs a batch, their steps sharing DiT calls (`workers.stages.step_batcher`), one-pass guidance
  on, for each ``--batches`` size;
- ``WanPipeline, B jobs per call`` -- diffusers' own batching (B prompts, a generator per job), for
  comparison with the farm's batching;
- ``quantized M`` -- ``transform.quantize`` (torchao's ``quantize_`` on a copy of the DiT), two-pass and
  one-pass, for each ``--quantize`` mode; the relative error column is of its latents against the
  two-pass latents of the full-precision DiT.

Rounds are interleaved (each round runs one job of every row) so a noisy machine slows all rows
alike; medians are reported. Ratios are jobs/min over the baseline's jobs/min measured in this run.
The deviation column is PSNR of each row's decoded frames against the uncached two-pass frames: the
weights are random, so it measures how far caching moves the output, not its quality.

The model is ``--model-dir`` (any Wan2.1 t2v directory in diffusers format) or ``--arch NAME``, a
preset of ``reelfarm model build`` written to a temporary directory (default ``bench``: DiT-bound on a
CPU), run at the preset's job shape unless ``--height/--width/--frames/--steps`` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scheduler.core.spec import CacheOptions

TEXT_TOKENS = 512
PROMPT_TOKENS = 12  # real tokens per prompt; the rest is zero padding, as the encode stage sends it
# Targets from issue 13, for the best combination against WanPipeline's jobs/min.
TARGET_WITH_CACHE = 2.0
TARGET_BATCH_OF_4 = 1.3  # one-pass guidance + batching 4 compatible jobs


@dataclass
class Row:
    name: str
    run_job: Callable[[int], torch.Tensor]
    seconds: list[float] = field(default_factory=list)
    dit_calls: int = 0
    dit_calls_skipped: int = 0
    setup_seconds: float = 0.0
    psnr_db: float | None = None
    jobs_per_run: int = 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dit", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a Wan2.1 t2v model dir (instead of building --arch)")
    parser.add_argument("--arch", default="bench", help="preset to build when no --model-dir (default: bench)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed jobs per row (median reported)")
    parser.add_argument("--batches", default="2,4", help="WanPipeline batch sizes to time (diffusers' own batching)")
    parser.add_argument("--thresholds", default="0.05,0.2", help="FirstBlockCache thresholds, comma-separated")
    parser.add_argument("--attention", default="", help="diffusers attention backends to time, comma-separated")
    parser.add_argument("--quantize", default="int8_dynamic", help="transform.quantize modes to time, comma-separated")
    parser.add_argument("--compile", action="store_true", help="also time transform.compile (slow to compile on CPU)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the bench runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.height, args.width, args.frames, args.steps, args.repeats, args.batches = 32, 32, 5, 3, 1, "2"
    return args


def job_shape(args: argparse.Namespace) -> None:
    """Fill the sizes not given on the command line from the preset's job (or the tiny test job)."""
    from workers.models.presets import arch_named

    preset = dict(arch_named(args.arch).job) if args.model_dir is None else {}
    defaults = {"height": 64, "width": 64, "frames": 17, "steps": 10}
    for name in defaults:
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, defaults[name]))


def random_embeds(text_dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds = torch.zeros(1, TEXT_TOKENS, text_dim)
    embeds[:, :PROMPT_TOKENS] = torch.randn(1, PROMPT_TOKENS, text_dim, generator=generator)
    return embeds.to(dtype)


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    from workers.models.loading import fresh_scheduler
    from workers.stage_compute import torch_dtype
    from workers.stages import dit_speed
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.transform import DenoiseStage

    dtype = torch_dtype(args.dtype)
    stage = DenoiseStage(model_dir, device=args.device, dtype=dtype)
    text_dim = int(stage.transformer.config["text_dim"])
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    jobs = args.repeats + 1 + max(batches, default=1)
    prompts = [random_embeds(text_dim, 2 * job, dtype) for job in range(jobs)]
    negatives = [random_embeds(text_dim, 2 * job + 1, dtype) for job in range(jobs)]
    size = {"height": args.height, "width": args.width, "num_frames": args.frames}
    job_kwargs = {**size, "num_inference_steps": args.steps, "guidance_scale": args.guidance, "flow_shift": None}
    # diffusers' pipeline around the same resident transformer; no text encoder or VAE needed for latents.
    # diffusers annotates every component as required; the latents-only path never touches the None ones.
    pipe = WanPipeline(
        tokenizer=None,  # type: ignore[arg-type]
        text_encoder=None,  # type: ignore[arg-type]
        vae=None,  # type: ignore[arg-type]
        scheduler=fresh_scheduler(stage.scheduler_template, None),  # type: ignore[arg-type]
        transformer=stage.transformer,
    )
    pipe.set_progress_bar_config(disable=True)

    def pipeline_batch(batch: int) -> Callable[[int], torch.Tensor]:
        # B jobs in one call, each with its own prompt and seed (a generator per job, as diffusers allows).
        def run_jobs(first: int) -> torch.Tensor:
            members = range(first, first + batch)
            out: torch.Tensor = pipe(
                prompt_embeds=torch.cat([prompts[job] for job in members]),
                negative_prompt_embeds=torch.cat([negatives[job] for job in members]),
                **size,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=[torch.Generator("cpu").manual_seed(job) for job in members],
                output_type="latent",
            ).frames
            return out[:1]

        return run_jobs

    def staged(
        denoiser: DenoiseStage, one_pass: bool, cache: CacheOptions | None, row: list[Row]
    ) -> Callable[[int], torch.Tensor]:
        def run_job(job: int) -> torch.Tensor:
            denoiser.one_pass_guidance = one_pass
            embeds = {"prompt_embeds": prompts[job], "negative_prompt_embeds": negatives[job]}
            with dit_speed.step_cache(denoiser.transformer, cache) as calls:
                latents = denoiser.denoise(embeds, seed=job, **job_kwargs)
            row[0].dit_calls, row[0].dit_calls_skipped = calls.calls, calls.skipped
            return latents

        return run_job

    def farm_batch(denoiser: DenoiseStage, batch: int) -> Callable[[int], torch.Tensor]:
        # B jobs as a batching transform worker runs them: a thread each, steps shared through the batcher.
        def run_jobs(first: int) -> torch.Tensor:
            results: dict[int, torch.Tensor] = {}

            def one(job: int) -> None:
                embeds = {"prompt_embeds": prompts[job], "negative_prompt_embeds": negatives[job]}
                results[job] = denoiser.denoise(embeds, seed=job, **job_kwargs)

            threads = [threading.Thread(target=one, args=(job,)) for job in range(first, first + batch)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if len(results) != batch:
                raise RuntimeError("a batched job failed; see the traceback above")
            return results[first]

        return run_jobs

    def add(name: str, denoiser: DenoiseStage, one_pass: bool, cache: CacheOptions | None) -> Row:
        holder: list[Row] = []
        row = Row(name, staged(denoiser, one_pass, cache, holder))
        holder.append(row)
        rows.append(row)
        return row

    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    rows: list[Row] = [Row("WanPipeline (baseline)", pipeline_batch(1), dit_calls=2 * args.steps)]
    add("stage, two-pass (all options off)", stage, False, None)
    add("one-pass guidance", stage, True, None)
    for threshold in thresholds:
        add(f"cache first_block t={threshold}", stage, False, CacheOptions(method="first_block", threshold=threshold))
    for backend in [b.strip() for b in args.attention.split(",") if b.strip()]:
        add(f"attention {backend}", DenoiseStage(model_dir, args.device, dtype, attention_backend=backend), False, None)
    best_cache = CacheOptions(method="first_block", threshold=max(thresholds)) if thresholds else None
    best_name = "best: one-pass + cache" if best_cache else "best: one-pass"
    add(best_name, stage, True, best_cache)
    if args.compile:
        compiled = DenoiseStage(model_dir, args.device, dtype, compile_blocks=True)
        add("compiled", compiled, False, None)
        add(best_name + " + compiled", compiled, True, best_cache)
    for mode in [m.strip() for m in args.quantize.split(",") if m.strip()]:
        from workers.stages.dit_quantize import quantize_dit

        quantized = DenoiseStage(model_dir, args.device, dtype)
        quantize_dit(quantized.transformer, mode)
        add(f"quantized {mode}, two-pass", quantized, False, None)
        add(f"quantized {mode} + one-pass", quantized, True, None)
    batching = DenoiseStage(model_dir, args.device, dtype, one_pass_guidance=True, batch_jobs=True)
    for batch in batches:
        name = f"farm batch of {batch} (transform.batch_size, one-pass)"
        rows.append(Row(name, farm_batch(batching, batch), dit_calls=args.steps, jobs_per_run=batch))
    for batch in batches:
        name = f"WanPipeline, {batch} jobs per call (diffusers' batching)"
        rows.append(Row(name, pipeline_batch(batch), dit_calls=2 * args.steps, jobs_per_run=batch))

    # Warm-up (not timed): first calls, lazy inits and, for the compiled row, compilation.
    for row in rows:
        print(f"warm-up: {row.name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        row.run_job(args.repeats)
        row.setup_seconds = time.perf_counter() - started
    outputs: dict[str, torch.Tensor] = {}
    for job in range(args.repeats):
        print(f"round {job + 1} of {args.repeats}", file=sys.stderr, flush=True)
        for row in rows:
            started = time.perf_counter()
            latents = row.run_job(job)
            row.seconds.append(time.perf_counter() - started)
            if job == 0:
                outputs[row.name] = latents.float()
    if (model_dir / "vae").is_dir():
        decoder = StreamingVaeDecoder(model_dir, device=args.device, dtype=dtype)
        reference = np.concatenate(list(decoder.iter_frames(outputs[rows[1].name])))
        for row in rows:
            if row.name in outputs:
                frames = np.concatenate(list(decoder.iter_frames(outputs[row.name])))
                row.psnr_db = psnr(frames, reference)

    base_seconds = statistics.median(rows[0].seconds)
    reference_latents = outputs[rows[1].name]
    report_rows = []
    for row in rows:
        seconds = statistics.median(row.seconds) / row.jobs_per_run
        error = (outputs[row.name] - reference_latents).norm() / reference_latents.norm()
        report_rows.append(
            {
                "option": row.name,
                "seconds_per_job": seconds,
                "seconds_per_step": seconds / args.steps,
                "jobs_per_min": 60.0 / seconds,
                "ratio": base_seconds / seconds,
                "jobs_per_call": row.jobs_per_run,
                "dit_calls": row.dit_calls,
                "dit_calls_skipped": row.dit_calls_skipped,
                "psnr_db_vs_uncached": row.psnr_db,
                "relative_error_vs_two_pass": float(error),
                "warmup_seconds": row.setup_seconds,
            }
        )
    return {
        "model_dir": str(model_dir),
        "transformer": {
            k: stage.transformer.config[k]
            for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")
        },
        "job": {
            **size,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "dtype": args.dtype,
            "device": args.device,
        },
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "rows": report_rows,
        "best_ratio": max(row["ratio"] for row in report_rows if row["option"].startswith("best")),
        "batch_of_4_ratio": next(
            (row["ratio"] for row in report_rows if row["option"].startswith("farm batch of 4 ")), None
        ),
    }


def render(report: dict[str, Any]) -> str:
    job = report["job"]
    lines = [
        f"DiT denoising ({report['arch'] or report['model_dir']}), {job['width']}x{job['height']}, {job['num_frames']} frames, {job['steps']} steps, "
        f"CFG {job['guidance_scale']}, {job['dtype']} on {job['device']} ({report['torch_threads']} threads); "
        f"transformer {report['transformer']}; median of {report['repeats']} jobs per row",
        "",
        "| option | s/step per job | jobs/min | vs WanPipeline | DiT calls (skipped) | PSNR vs uncached | rel. error | warm-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        psnr_text = "-" if row["psnr_db_vs_uncached"] is None else f"{row['psnr_db_vs_uncached']:.1f} dB"
        lines.append(
            f"| {row['option']} | {row['seconds_per_step']:.3f} | {row['jobs_per_min']:.2f} | {row['ratio']:.2f}x | "
            f"{row['dit_calls']} ({row['dit_calls_skipped']}) | {psnr_text} | {row['relative_error_vs_two_pass']:.1e} | "
            f"{row['warmup_seconds']:.1f} |"
        )
    met = "met" if report["best_ratio"] >= TARGET_WITH_CACHE else "MISSED"
    batch_of_4 = report["batch_of_4_ratio"]
    lines += [""]
    if batch_of_4 is not None:
        batch_met = "met" if batch_of_4 >= TARGET_BATCH_OF_4 else "MISSED"
        lines.append(
            f"one-pass guidance + a batch of 4: {batch_of_4:.2f}x WanPipeline's jobs/min (target >= "
            f"{TARGET_BATCH_OF_4}x: {batch_met})."
        )
    lines += [
        f"best combination: {report['best_ratio']:.2f}x WanPipeline's jobs/min (target with caching "
        f">= {TARGET_WITH_CACHE}x: {met}). PSNR is against the uncached two-pass frames; the weights are "
        "random, so it is a measure of deviation, not a quality judgement.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    job_shape(args)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-dit-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from workers.models.presets import build_arch_model

            model_dir = build_arch_model(Path(tmp) / args.arch, args.arch)
        report = run(args, model_dir)
        report["arch"] = args.arch if args.model_dir is None else None
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
