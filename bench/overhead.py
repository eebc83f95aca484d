"""Per-job farm overhead: end-to-end latency minus the stages' compute, and where the rest goes.

Run: ``python -m bench.overhead [--serial 12] [--queue 20] [--json PATH]``.

A tiny model (built here), one worker per stage, the smallest job the model
takes (64x64, 5 frames, 2 steps), so that compute is small and the farm's own
time shows. From each job's record (times written by the workers themselves):

- **e2e**: submission (``created_at``) to the decode stage's finish (the same
  transaction that marks the job succeeded);
- **compute**: each stage's ``compute_seconds`` -- the model's work, the
  decode stage's ffmpeg and upload included;
- **overhead** = e2e - the sum of compute, split into
  - *wait* per stage: from when the job was ready for the stage (submitted, or
    the previous stage finished) **and** a worker of that stage was free (its
    previous span ended) to the stage's start -- rq's dequeue, the call check,
    the record reads and the start fence; time spent behind other jobs in a
    queue is not overhead and is left out;
  - *in-stage* per stage: the stage's span minus its compute -- pulling the
    input over Mooncake (claim, transfer, checksum, ack), publishing the
    output, the finishing transaction.

Two runs: jobs one at a time (``--serial``, the first two are warm-up and not
counted), then ``--queue`` jobs submitted at once. Medians and p95 are printed.
Target: overhead under 30 ms plus the transfer time.

The queue run also counts what the farm's protocol costs Redis per job
(``INFO commandstats``, reset before it): commands and Redis CPU microseconds,
and the jobs/s at which those microseconds fill one single-threaded Redis --
the control plane's ceiling, whatever the stages compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench.local_farm import build_model, connect, farm_servers, running_layout, wait_all_finished
from scheduler.core.job_record import JobState, StageField, read_records, stage_field
from scheduler.core.keys import Hop, Stage
from scheduler.core.route import THREE_HOPS
from scheduler.intake.submit import submit

TARGET_MS = 30.0
JOB = {"prompt": "a red fox running through snow", "width": 64, "height": 64, "frames": 5, "steps": 2}
WARMUP = 2

# The bench farm runs unsplit jobs: the three-hop route.
ROUTE = THREE_HOPS


@dataclass
class JobOverhead:
    e2e: float
    compute: float
    wait: dict[str, float]
    in_stage: dict[str, float]
    pull: dict[str, float]  # the hand-off into each stage (part of in_stage): claim, transfer, checksum, ack

    @property
    def overhead(self) -> float:
        return self.e2e - self.compute


def _f(record: dict[str, str], stage: Hop, name: StageField) -> float:
    return float(record[stage_field(stage, name)])


def overheads(records: list[dict[str, str]], slots: int = 2) -> list[JobOverhead]:
    """Each job's overhead split, in submission order (records must all have succeeded).

    A stage's wait starts once the job is ready for it, a worker of the stage is
    free, and -- for encode and transform, which hand off -- that worker has a
    free slot (``slots`` per worker; a slot frees when the next stage has pulled
    from it): a producer with its slots full waits on purpose (backpressure).
    """
    free_at: dict[tuple[str, str], float] = {}
    produced: dict[tuple[str, str], list[int]] = {}
    spans = sorted(
        ((_f(r, stage, StageField.STARTED_AT), stage, i) for i, r in enumerate(records) for stage in Stage),
        key=lambda item: item[0],
    )
    wait: list[dict[str, float]] = [{} for _ in records]
    for start, stage, i in spans:
        record = records[i]
        before, after = ROUTE.previous(stage), ROUTE.next(stage)
        ready = float(record["created_at"]) if before is None else _f(record, before, StageField.FINISHED_AT)
        worker = (stage.value, record[stage_field(stage, StageField.WORKER)])
        free = free_at.get(worker, 0.0)
        done_before = produced.setdefault(worker, [])
        if after is not None and len(done_before) >= slots:
            holder = records[done_before[-slots]]
            free = max(free, _f(holder, after, StageField.STARTED_AT) + _f(holder, after, StageField.PULL_SECONDS))
        wait[i][stage.value] = max(0.0, start - max(ready, free))
        free_at[worker] = _f(record, stage, StageField.FINISHED_AT)
        done_before.append(i)
    out = []
    for i, record in enumerate(records):
        compute = {s.value: _f(record, s, StageField.COMPUTE_SECONDS) for s in Stage}
        in_stage = {
            s.value: _f(record, s, StageField.FINISHED_AT) - _f(record, s, StageField.STARTED_AT) - compute[s.value]
            for s in Stage
        }
        pull = {s.value: _f(record, s, StageField.PULL_SECONDS) if ROUTE.previous(s) else 0.0 for s in Stage}
        e2e = _f(record, Stage.DECODE, StageField.FINISHED_AT) - float(record["created_at"])
        out.append(JobOverhead(e2e, sum(compute.values()), wait[i], in_stage, pull))
    return out


def queue_adjusted(job: JobOverhead) -> float:
    """The overhead that is the farm's: waits (not time behind other jobs) plus in-stage work."""
    return sum(job.wait.values()) + sum(job.in_stage.values())


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def summary(name: str, jobs: list[JobOverhead]) -> dict[str, Any]:
    farm = [queue_adjusted(j) * 1000 for j in jobs]
    beyond_transfer = [(queue_adjusted(j) - sum(j.pull.values())) * 1000 for j in jobs]
    return {
        "transfer_ms_median": statistics.median(sum(j.pull.values()) * 1000 for j in jobs),
        "beyond_transfer_ms_median": statistics.median(beyond_transfer),
        "beyond_transfer_ms_p95": _p95(beyond_transfer),
        "run": name,
        "jobs": len(jobs),
        "e2e_ms_median": statistics.median(j.e2e * 1000 for j in jobs),
        "compute_ms_median": statistics.median(j.compute * 1000 for j in jobs),
        "overhead_ms_median": statistics.median(farm),
        "overhead_ms_p95": _p95(farm),
        "wait_ms_median": {s.value: statistics.median(j.wait[s.value] * 1000 for j in jobs) for s in Stage},
        "in_stage_ms_median": {s.value: statistics.median(j.in_stage[s.value] * 1000 for j in jobs) for s in Stage},
    }


def idle_load(conn: redis.Redis, seconds: float) -> dict[str, float]:
    """Commands and Redis CPU per second of an idle farm: heartbeats, blocking dequeues timing out."""
    conn.config_resetstat()
    time.sleep(seconds)
    stats = conn.info("commandstats")
    return {
        "calls_per_s": sum(int(stat["calls"]) for stat in stats.values()) / seconds,
        "usec_per_s": sum(int(stat["usec"]) for stat in stats.values()) / seconds,
    }


def wait_quietly(conn: redis.Redis, job_ids: list[str], timeout: float, every: float = 0.25) -> int:
    """Wait for every job to finish reading only their states, every ``every`` s; returns the commands sent."""
    deadline, sent = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        states = [r.get("state") if r else None for _, r in read_records(conn, job_ids, ["state"])]
        sent += len(job_ids)
        if all(state is not None and JobState(state).finished for state in states):
            return sent
        time.sleep(every)
    raise TimeoutError(f"the queued bench jobs did not finish in {timeout:.0f}s")


def redis_load(
    commandstats: dict[str, Any], jobs: int, *, own_calls: int, idle: dict[str, float], seconds: float
) -> dict[str, Any]:
    """Commands and Redis CPU microseconds per job from ``INFO commandstats`` (reset before the run).

    The bench's own state polls (``own_calls`` HMGETs) and what the idle farm
    would have sent anyway over the run (heartbeats: ``idle`` rates x ``seconds``)
    are taken out, so what is left is the protocol's cost per job.
    """
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in commandstats.items()}
    usec = sum(int(stat["usec"]) for stat in commandstats.values())
    hmget = commandstats.get("cmdstat_hmget", {"calls": 0, "usec": 0})
    own_usec = int(hmget["usec"]) * min(1.0, own_calls / max(1, int(hmget["calls"])))
    protocol_calls = sum(calls.values()) - own_calls - idle["calls_per_s"] * seconds
    protocol_usec = usec - own_usec - idle["usec_per_s"] * seconds
    per_job_us = max(protocol_usec, 0.0) / jobs
    top = sorted(calls.items(), key=lambda item: -item[1])[:6]
    return {
        "commands_per_job": protocol_calls / jobs,
        "redis_us_per_job": per_job_us,
        "ceiling_jobs_per_s": 1e6 / per_job_us if per_job_us else 0.0,
        "idle_calls_per_s": idle["calls_per_s"],
        "top": ", ".join(f"{name} {count / jobs:.1f}" for name, count in top),
        "calls": calls,
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | jobs | e2e (median) | compute | farm overhead median / p95 | of which pulls (t + d) "
        "| beyond the pulls median / p95 | wait e / t / d | in-stage e / t / d |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        waits = " / ".join(f"{row['wait_ms_median'][s.value]:.1f}" for s in Stage)
        inside = " / ".join(f"{row['in_stage_ms_median'][s.value]:.1f}" for s in Stage)
        lines.append(
            f"| {row['run']} | {row['jobs']} | {row['e2e_ms_median']:.0f} ms | {row['compute_ms_median']:.0f} ms "
            f"| {row['overhead_ms_median']:.1f} / {row['overhead_ms_p95']:.1f} ms | {row['transfer_ms_median']:.1f} ms "
            f"| **{row['beyond_transfer_ms_median']:.1f}** / {row['beyond_transfer_ms_p95']:.1f} ms "
            f"| {waits} ms | {inside} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--serial", type=int, default=12, help="jobs one at a time (2 more as warm-up)")
    parser.add_argument("--queue", type=int, default=20, help="jobs submitted at once")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-overhead-") as tmp:
        model_dir = build_model("tiny", Path(tmp) / "tiny")
        with farm_servers(Path(tmp) / "farm", model_dir, spec_defaults={"fps": 16}) as settings:
            conn = connect(settings)
            with running_layout(settings, {stage: 1 for stage in Stage}):
                serial = []
                for _ in range(args.serial + WARMUP):
                    job_id = submit(conn, settings, JOB)
                    serial += wait_all_finished(conn, [job_id], timeout=120)
                idle = idle_load(conn, seconds=3.0)
                conn.config_resetstat()
                started = time.monotonic()
                queued_ids = [submit(conn, settings, JOB) for _ in range(args.queue)]
                polls = wait_quietly(conn, queued_ids, timeout=600)
                stats = conn.info("commandstats")
                load = redis_load(stats, args.queue, own_calls=polls, idle=idle, seconds=time.monotonic() - started)
                queued = wait_all_finished(conn, queued_ids, timeout=10)
    rows = [summary("one at a time", overheads(serial)[WARMUP:]), summary(f"queue of {args.queue}", overheads(queued))]
    print(render(rows))
    print(
        f"Redis per job (queue run, submission included; the bench's polls and the idle farm's "
        f"{load['idle_calls_per_s']:.0f} commands/s of heartbeats taken out): {load['commands_per_job']:.0f} "
        f"commands, {load['redis_us_per_job']:.0f} us of Redis CPU: one single-threaded Redis saturates near "
        f"{load['ceiling_jobs_per_s']:,.0f} jobs/s. Busiest per job (all): {load['top']}"
    )
    worst = max(row["beyond_transfer_ms_median"] for row in rows)
    verdict = "meets" if worst < TARGET_MS else "misses"
    print(f"target: farm overhead < {TARGET_MS:.0f} ms plus the transfer time: {worst:.1f} ms at worst ({verdict})")
    if args.json:
        serial_splits = [asdict(j) for j in overheads(serial)]
        args.json.write_text(json.dumps({"rows": rows, "redis": load, "serial": serial_splits}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
