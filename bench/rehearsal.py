"""Rehearsal: one job of the production-shape ``wan2.1-t2v-1.3b`` preset end to end through the farm.

Run: ``python -m bench.rehearsal [--arch wan2.1-t2v-1.3b] [--model-dir DIR] [--json PATH]``.

Builds the preset (random weights; about 7 GB on disk for the 1.3b shape) unless
``--model-dir`` names one, starts Valkey, an S3 server and one worker per stage
exactly as ``reelfarm up`` does, renders the preset's job shape (``ModelArch.job``:
a small resolution that completes on a CPU), and reports per stage, from the job
record and the workers' own accounting:

- the stage's seconds and the model's share of them (``compute_seconds``),
- the hand-off into the stage: bytes pulled and the pull's seconds,
- the worker's resident memory once loaded and its peak by the end of the job
  (``VmRSS`` before the job, ``VmHWM`` after, read from ``/proc``),
- the slot size each worker registered (sized from the served models' configs
  and the farm's resolution limits).

The job must complete: this is the check that the published shapes run through
every stage, the hand-offs and the upload on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.local_farm import arch_job_shape, build_model, connect, farm_servers, running_layout, wait_all_finished
from scheduler.core import worker_registry
from scheduler.core.job_record import StageField, stage_field
from scheduler.core.keys import Stage
from scheduler.intake.submit import submit

MiB = 2**20


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def render(
    arch: str, shape: dict[str, int], record: dict[str, str], workers: dict[str, dict[str, Any]], e2e: float
) -> str:
    lines = [
        f"rehearsal: one {arch} job, {shape['width']}x{shape['height']}, {shape['frames']} frames, "
        f"{shape['steps']} steps: {e2e:.1f} s end to end",
        "| stage | stage s | compute s | input pulled | pull s | worker RSS loaded | worker peak | slot size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in Stage:
        values = {name: record.get(stage_field(stage, name)) for name in StageField}
        pulled = values[StageField.INPUT_BYTES]
        handoff = (
            f"{int(pulled) / MiB:.2f} MiB | {float(values[StageField.PULL_SECONDS] or 0) * 1000:.1f} ms"
            if pulled
            else "- | -"
        )
        worker = workers[stage.value]
        lines.append(
            f"| {stage.value} | {float(values[StageField.SECONDS] or 0):.2f} "
            f"| {float(values[StageField.COMPUTE_SECONDS] or 0):.2f} | {handoff} "
            f"| {worker['rss_loaded_kib'] / 1024:.0f} MiB | {worker['peak_kib'] / 1024:.0f} MiB "
            f"| {worker['slot_bytes'] / MiB:.1f} MiB x {worker['slots']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wan2.1-t2v-1.3b")
    parser.add_argument("--model-dir", type=Path, help="an existing directory of --arch (default: built in a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = arch_job_shape(args.arch)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-rehearsal-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            started = time.monotonic()
            model_dir = build_model(args.arch, Path(tmp) / "model")
            print(f"built {args.arch} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        with farm_servers(Path(tmp) / "farm", model_dir.resolve(), spec_defaults={"fps": 16}) as settings:
            conn = connect(settings)
            with running_layout(settings, {stage: 1 for stage in Stage}):
                records = {w["stage"]: w for w in worker_registry.live_workers(conn)}
                workers: dict[str, dict[str, Any]] = {
                    stage: {
                        "pid": int(w["pid"]),
                        "rss_loaded_kib": proc_status_kib(int(w["pid"]), "VmRSS"),
                        "slot_bytes": int(w.get("slot_bytes", 0)),
                        "slots": int(w.get("slots", 0)),
                    }
                    for stage, w in records.items()
                }
                submitted = time.time()
                job_id = submit(conn, settings, {"prompt": "a red fox running through snow", **shape})
                (record,) = wait_all_finished(conn, [job_id], timeout=3600)
                for worker in workers.values():
                    worker["peak_kib"] = proc_status_kib(worker["pid"], "VmHWM")
    e2e = float(record[stage_field(Stage.DECODE, StageField.FINISHED_AT)]) - submitted
    print(render(args.arch, shape, record, workers, e2e))
    if args.json:
        args.json.write_text(json.dumps({"record": record, "workers": workers, "e2e": e2e}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
