"""Pipeline throughput: N jobs through the farm vs diffusers' WanPipeline in a loop vs a one-stage rq worker.

Run: ``python -m bench.pipeline [--jobs 6] [--rounds 2] [--layouts 1:1:1,1:2:1] [--arch bench] [--json PATH]``.

Every side runs ``--jobs`` jobs per round, the sides interleaved round by
round, so that load from elsewhere on a shared machine hits all of them alike;
figures are totals (and means) over the rounds.

Same model directory (built here: the ``bench`` preset by default), same job
specs (the preset's job shape, seeds 0..N-1, guidance on), same S3 server and
the same CPUs for every side:

1. **loop** -- one process, ``WanPipeline`` per job, then ffmpeg and one S3
   upload (`bench.pipeline.baselines`), ``--threads`` torch threads.
2. **rq** -- the same work as the job function of one rq ``SimpleWorker``.
3. **farm E:T:D** -- the farm's encode, transform and decode workers
   (``reelfarm up --workers`` planning: `scheduler.local.embedded.plan_workers`)
   fed one batch of N jobs.

Reported per side: videos/min and its ratio to the loop; for the farm, each
stage's busy fraction over the processing window, the DiT's busy fraction in
steady state (from its first start to its last end: the window in which every
gap is the farm's fault), the mean stage seconds and the ideal ratio -- the
loop's seconds per job over the farm's DiT seconds per job per transform worker,
what perfect overlap would give. Targets: DiT busy >= 0.95 in steady state,
farm >= 1.0x the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.local_farm import (
    arch_job_shape,
    build_model,
    connect,
    farm_servers,
    layout_of,
    running_layout,
    wait_all_finished,
)
from scheduler.core.job_record import StageField, stage_field
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from scheduler.ops.batch import submit_batch
from scheduler.ops.batch_file import parse_batch, specs_to_text
from scheduler.ops.timeline import load_timelines, utilisation

REPO = Path(__file__).resolve().parents[2]
DIT_BUSY_TARGET = 0.95
THROUGHPUT_TARGET = 1.0
PROMPTS = ["a red fox running through snow", "a lighthouse at dusk", "rain on a city street", "a bird over the sea"]


@dataclass
class Side:
    name: str
    jobs: int
    seconds: float
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    dit_busy_steady: float | None = None
    transform_workers: int = 1

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.jobs / self.seconds if self.seconds > 0 else 0.0


def job_specs(count: int, shape: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"prompt": f"{PROMPTS[i % len(PROMPTS)]}, take {i}", "seed": i, "guidance_scale": 5.0, "fps": 16, **shape}
        for i in range(count)
    ]


def run_baseline(mode: str, settings: FarmSettings, specs: list[dict[str, Any]], threads: int) -> Side:
    defaults = {"negative_prompt": "", "guidance_scale": 5.0}
    config = {
        "model_dir": str(settings.model_dir),
        "redis_url": settings.redis_url,
        "s3": json.loads(settings.s3.model_dump_json()),
        "threads": threads,
        "jobs": [{**defaults, **spec} for spec in specs],
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.pipeline.baselines", mode],
        input=json.dumps(config).encode(),
        capture_output=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} baseline failed:\n{done.stderr.decode()[-3000:]}")
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    side = Side(mode, len(specs), result["end"] - result["start"])
    side.stages["job"] = {"mean_seconds": statistics.mean(result["job_seconds"])}
    return side


def run_farm(
    settings: FarmSettings, layout_text: str, specs: list[dict[str, Any]], timeout: float, round_index: int = 0
) -> Side:
    layout, dit_threads = layout_of(layout_text)
    conn = connect(settings)
    name = f"bench-{layout_text.replace(':', '-')}-r{round_index}"
    with running_layout(settings, layout, dit_threads) as slots:
        planned = ", ".join(f"{s.name}: {s.threads} thread{'s' if s.threads > 1 else ''}" for s in slots)
        print(f"farm {layout_text}: {planned}", file=sys.stderr)
        parsed = parse_batch(specs_to_text(specs), settings, name=name)
        outcome = submit_batch(conn, settings, parsed)
        wait_all_finished(conn, outcome.created, timeout)
    timelines = load_timelines(conn, name)
    stages = utilisation(timelines)
    spans = [s for job in timelines for s in job.spans if s.end is not None]
    start = min(s.start for s in spans)
    end = max(s.end for s in spans if s.end is not None)
    side = Side(f"farm {layout_text}", len(specs), end - start, transform_workers=layout[Stage.TRANSFORM])
    for stage in Stage:
        own = [s for s in spans if s.stage == stage.value]
        side.stages[stage.value] = {
            "busy": stages[stage.value].fraction,
            "mean_seconds": statistics.mean((s.end or s.start) - s.start for s in own),
        }
    dit = [s for s in spans if s.stage == Stage.TRANSFORM.value]
    dit_window = max(s.end or s.start for s in dit) - min(s.start for s in dit)
    busy = sum((s.end or s.start) - s.start for s in dit)
    side.dit_busy_steady = busy / (dit_window * layout[Stage.TRANSFORM]) if dit_window > 0 else 0.0
    # The stage seconds the record keeps are the span's; check they are what the record says.
    assert all(stage_field(Stage.TRANSFORM, StageField.SECONDS) in job.fields for job in timelines)
    return side


def combine(rounds: list[Side]) -> Side:
    """One side over several rounds: total jobs over total seconds; busy fractions and stage means averaged."""
    first = rounds[0]
    side = Side(first.name, sum(r.jobs for r in rounds), sum(r.seconds for r in rounds))
    side.transform_workers = first.transform_workers
    for stage in first.stages:
        side.stages[stage] = {key: statistics.mean(r.stages[stage][key] for r in rounds) for key in first.stages[stage]}
    if first.dit_busy_steady is not None:
        side.dit_busy_steady = statistics.mean(r.dit_busy_steady or 0.0 for r in rounds)
    return side


def report(sides: list[Side], threads: int, arch: str) -> str:
    loop = next((s for s in sides if s.name == "loop"), None)
    lines = [
        f"pipeline throughput, {arch} preset, {sides[0].jobs} jobs, {threads} CPUs "
        f"({platform.machine()}, Python {platform.python_version()})",
        "| side | seconds | videos/min | vs loop | ideal | DiT busy (steady) | encode / transform / decode busy "
        "| mean stage s (e / t / d) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        ratio = f"{side.videos_per_minute / loop.videos_per_minute:.2f}x" if loop else "-"
        ideal = busy = stages = means = "-"
        if side.dit_busy_steady is not None:
            dit_seconds = side.stages[Stage.TRANSFORM.value]["mean_seconds"] / side.transform_workers
            if loop:
                ideal = f"{loop.stages['job']['mean_seconds'] / dit_seconds:.2f}x"
            busy = f"{side.dit_busy_steady:.3f}"
            stages = " / ".join(f"{side.stages[s.value]['busy']:.2f}" for s in Stage)
            means = " / ".join(f"{side.stages[s.value]['mean_seconds']:.2f}" for s in Stage)
        elif "job" in side.stages:
            means = f"{side.stages['job']['mean_seconds']:.2f} per job"
        lines.append(
            f"| {side.name} | {side.seconds:.1f} | {side.videos_per_minute:.2f} | {ratio} | {ideal} | {busy} "
            f"| {stages} | {means} |"
        )
    for side in sides:
        if side.dit_busy_steady is None:
            continue
        t, d, e = (side.stages[s.value]["mean_seconds"] for s in (Stage.TRANSFORM, Stage.DECODE, Stage.ENCODE))
        verdicts = [
            f"DiT busy {side.dit_busy_steady:.3f} ({'meets' if side.dit_busy_steady >= DIT_BUSY_TARGET else 'misses'} >= {DIT_BUSY_TARGET})",
            f"DiT/decode {t / d:.1f}x, encode {'cheapest' if e < d else 'not cheapest'}",
        ]
        if loop:
            speedup = side.videos_per_minute / loop.videos_per_minute
            verdicts.append(
                f"{speedup:.2f}x the loop ({'meets' if speedup >= THROUGHPUT_TARGET else 'misses'} >= {THROUGHPUT_TARGET}x)"
            )
        lines.append(f"{side.name}: " + "; ".join(verdicts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="jobs per side per round")
    parser.add_argument(
        "--layouts", default="1:1:1,1:2:1", help="farm layouts encode:transform:decode, comma-separated"
    )
    parser.add_argument("--arch", default="bench", help="model preset to build and run (tiny for a smoke run)")
    parser.add_argument("--model-dir", type=Path, help="an existing model dir of --arch (default: built in a temp dir)")
    parser.add_argument("--steps", type=int, help="override the preset's steps (smoke runs)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="baselines' torch threads")
    parser.add_argument("--skip", default="", help="comma-separated sides to leave out: loop, rq")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --jobs jobs per side, interleaved")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    shape = arch_job_shape(args.arch)
    if args.steps:
        shape["steps"] = args.steps
    specs = job_specs(args.jobs, shape)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-pipeline-") as tmp:
        home = Path(tmp)
        model_dir = args.model_dir or build_model(args.arch, home / "model")
        measured: dict[str, list[Side]] = {}
        with farm_servers(home / "farm", model_dir.resolve(), spec_defaults={"fps": 16}) as settings:
            # Rounds interleave the sides, so a shared machine's drift hits them alike.
            for round_index in range(args.rounds):
                for mode in ("loop", "rq"):
                    if mode not in skip:
                        side = run_baseline(mode, settings, specs, args.threads)
                        measured.setdefault(side.name, []).append(side)
                        print(f"round {round_index}: {mode}: {side.videos_per_minute:.2f} videos/min", file=sys.stderr)
                for layout in args.layouts.split(","):
                    side = run_farm(settings, layout, specs, args.timeout, round_index)
                    measured.setdefault(side.name, []).append(side)
                    print(f"round {round_index}: {side.name}: {side.videos_per_minute:.2f} videos/min", file=sys.stderr)
    sides = [combine(rounds) for rounds in measured.values()]
    print(report(sides, args.threads, args.arch))
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(s), "videos_per_minute": s.videos_per_minute} for s in sides], indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
