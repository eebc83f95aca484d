"""Wan2.2 expert placement: ``split`` (one transform worker per expert) vs ``together`` (one worker, both DiTs).

Run: ``python -m bench.experts [--jobs 6] [--rounds 2] [--arch bench-2expert] [--json PATH]``.

Both sides run the same jobs (the preset's shape, seeds 0..N-1, guidance on) on the same CPUs, through the
same farm of real parts (`bench.local_farm`: Valkey, SeaweedFS, ``python -m workers`` processes planned by
``reelfarm up``'s planner), rounds interleaved so drift on a shared machine hits both alike:

- **together** -- encode, one transform worker holding both experts (route ``encode -> transform -> decode``),
  decode; what peers do (minus their CPU swapping: both experts stay resident).
- **split** -- encode, a ``--expert high`` and a ``--expert low`` transform worker, decode (route
  ``encode -> transform@high -> transform@low -> decode``, the boundary hand-off over Mooncake).

Reported: videos/min and split's ratio to together; each transform worker's busy fraction over the
processing window; the peak resident memory (VmHWM) of each transform worker process, and split's per-worker
peak over together's -- the point of splitting: each expert's worker holds one DiT, so about half.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.local_farm import arch_job_shape, build_model, connect, farm_servers, wait_all_finished
from scheduler.core.keys import Hop, Stage
from scheduler.core.model_options import ExpertPlacement, ModelOptions
from scheduler.core.settings import FarmSettings
from scheduler.local.embedded import plan_workers, start_worker, wait_for_workers
from scheduler.local.processes import stop_child
from scheduler.ops.batch import submit_batch
from scheduler.ops.batch_file import parse_batch, specs_to_text
from scheduler.ops.timeline import load_timelines, utilisation

PROMPTS = ["a red fox running through snow", "a lighthouse at dusk", "rain on a city street", "a bird over the sea"]
SIDES: dict[str, dict[Hop, int]] = {
    "together": {Stage.ENCODE: 1, Stage.TRANSFORM: 1, Stage.DECODE: 1},
    "split": {Stage.ENCODE: 1, Hop("transform@high"): 1, Hop("transform@low"): 1, Stage.DECODE: 1},
}


@dataclass
class Side:
    name: str
    jobs: int
    seconds: float
    # transform hop -> busy fraction over the processing window
    busy: dict[str, float] = field(default_factory=dict)
    # transform worker (its hop) -> peak resident MiB
    peak_mib: dict[str, float] = field(default_factory=dict)

    @property
    def videos_per_minute(self) -> float:
        return 60.0 * self.jobs / self.seconds if self.seconds > 0 else 0.0


def peak_resident_mib(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def run_side(base: FarmSettings, name: str, specs: list[dict[str, Any]], timeout: float, round_index: int) -> Side:
    placement: ExpertPlacement = "together" if name == "together" else "split"
    settings = base.model_copy(update={"model_options": {"default": ModelOptions(experts=placement)}})
    slots = plan_workers(SIDES[name], sorted(os.sched_getaffinity(0)))
    log_dir = settings.home / "logs"
    procs = []
    try:
        procs = [
            start_worker(slot.stage, settings, log_dir, slot=slot, log_name=f"{name}-{slot.name}") for slot in slots
        ]
        wait_for_workers(settings, list(Stage), procs, log_dir)
        conn = connect(settings)
        batch_name = f"experts-{name}-r{round_index}"
        outcome = submit_batch(conn, settings, parse_batch(specs_to_text(specs), settings, name=batch_name))
        wait_all_finished(conn, outcome.created, timeout)
        peaks = {
            (f"transform@{slot.expert}" if slot.expert else "transform"): peak_resident_mib(proc.pid)
            for slot, proc in zip(slots, procs, strict=True)
            if slot.stage is Stage.TRANSFORM
        }
    finally:
        for proc in procs:
            stop_child(proc, timeout=30.0)
    timelines = load_timelines(conn, batch_name)
    spans = [s for job in timelines for s in job.spans if s.end is not None]
    seconds = max(s.end for s in spans if s.end is not None) - min(s.start for s in spans)
    stages = utilisation(timelines)
    busy = {hop: u.fraction for hop, u in stages.items() if Hop(hop).kind is Stage.TRANSFORM and u.busy_seconds > 0}
    return Side(name, len(specs), seconds, busy, peaks)


def combine(rounds: list[Side]) -> Side:
    first = rounds[0]
    return Side(
        first.name,
        sum(r.jobs for r in rounds),
        sum(r.seconds for r in rounds),
        {hop: statistics.mean(r.busy[hop] for r in rounds) for hop in first.busy},
        {hop: max(r.peak_mib[hop] for r in rounds) for hop in first.peak_mib},
    )


def figures(together: Side, split: Side) -> dict[str, float]:
    return {
        "split_vs_together_videos_per_min": split.videos_per_minute / together.videos_per_minute,
        "split_peak_over_together_peak": max(split.peak_mib.values()) / max(together.peak_mib.values()),
    }


def report(together: Side, split: Side, arch: str, cpus: int) -> str:
    ratios = figures(together, split)
    lines = [
        f"expert placement, {arch} preset, {together.jobs} jobs per side, {cpus} CPUs "
        f"({platform.machine()}, Python {platform.python_version()})",
        "| placement | seconds | videos/min | transform busy (per hop) | peak resident MiB per transform worker |",
        "|---|---|---|---|---|",
    ]
    for side in (together, split):
        busy = ", ".join(f"{hop} {fraction:.2f}" for hop, fraction in side.busy.items())
        peaks = ", ".join(f"{hop} {mib:.0f}" for hop, mib in side.peak_mib.items())
        lines.append(f"| {side.name} | {side.seconds:.1f} | {side.videos_per_minute:.2f} | {busy} | {peaks} |")
    lines.append(
        f"split: {ratios['split_vs_together_videos_per_min']:.2f}x together's videos/min; a split transform "
        f"worker's peak memory is {ratios['split_peak_over_together_peak']:.2f}x the together worker's"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experts", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="jobs per side per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arch", default="bench-2expert", help="a two-expert preset (tiny-2expert for a smoke run)")
    parser.add_argument("--model-dir", type=Path, help="an existing model dir of --arch (default: built here)")
    parser.add_argument("--steps", type=int, help="override the preset's steps (smoke runs)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = arch_job_shape(args.arch)
    if args.steps:
        shape["steps"] = args.steps
    specs = [
        {"prompt": f"{PROMPTS[i % len(PROMPTS)]}, take {i}", "seed": i, "guidance_scale": 5.0, **shape}
        for i in range(args.jobs)
    ]
    measured: dict[str, list[Side]] = {"together": [], "split": []}
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-experts-") as tmp:
        home = Path(tmp)
        model_dir = args.model_dir or build_model(args.arch, home / "model")
        with farm_servers(home / "farm", model_dir.resolve(), spec_defaults={"fps": 16}) as settings:
            for round_index in range(args.rounds):
                for name in measured:
                    side = run_side(settings, name, specs, args.timeout, round_index)
                    measured[name].append(side)
                    print(f"round {round_index}: {name}: {side.videos_per_minute:.2f} videos/min", file=sys.stderr)
    together, split = (combine(rounds) for rounds in measured.values())
    print(report(together, split, args.arch, len(os.sched_getaffinity(0))))
    if args.json:
        sides = {s.name: {**asdict(s), "videos_per_minute": s.videos_per_minute} for s in (together, split)}
        args.json.write_text(json.dumps({"sides": sides, **figures(together, split)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
