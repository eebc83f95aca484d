"""Batch submission throughput: ``reelfarm batch``'s code path against raw rq ``enqueue_many``, in one run.

Run: ``python -m bench.submit_throughput [--count 10000] [--repeats 3] [--chunk 500] [--json PATH]``.

Both sides put the same number of encode-stage jobs on the same rq queue of
the same Valkey (started by the bench in a temporary folder, stopped on the way
out), with the same job payload rq stores:

1. **farm** -- ``scheduler.ops.batch``: parse and validate every JSONL line
   (pydantic spec + farm limits), derive each job id, check which jobs exist
   (WATCH + one pipelined read per chunk), then per chunk one MULTI with the job
   records, the rq enqueues and the batch record.
2. **farm rerun** -- the same file again: every job exists, nothing is written
   (what an operator's "run it again" costs).
3. **raw rq** -- ``Queue.prepare_data`` + ``Queue.enqueue_many`` of the same
   count with the same function, kwargs, ids and TTLs: no validation, no job
   records; measured both in one pipeline and in pipelines of ``--chunk``
   jobs, and the faster of the two is the baseline.

The database is flushed between measurements (not timed); repeats interleave
the sides so drift on a shared machine hits both alike; medians are reported.
Target: farm >= 0.5x raw rq.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from scheduler.core import keys, queues
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from scheduler.local.valkey import start_valkey
from scheduler.ops import batch

TARGET_RATIO = 0.5


def batch_text(count: int) -> str:
    """``count`` distinct, valid spec lines, the shape a real prompt file has."""
    subjects = ["a lighthouse at dusk", "a red fox in snow", "rain on a neon street", "a paper boat on a river"]
    return "\n".join(
        json.dumps(
            {
                "prompt": f"{subjects[i % len(subjects)]}, variation {i}",
                "seed": i,
                "width": 832,
                "height": 480,
                "frames": 81,
                "steps": 50,
            }
        )
        for i in range(count)
    )


def time_it(setup: Callable[[], None], run: Callable[[], Any]) -> float:
    setup()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.submit_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="specs per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=batch.CHUNK_SIZE, help="jobs per pipeline round trip")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    password = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-") as tmp:
        server = start_valkey(Path(tmp) / "valkey", None, password)
        try:
            conn = redis.Redis(host="127.0.0.1", port=server.port, password=password)
            figures = run(conn, args.count, args.repeats, args.chunk)
        finally:
            server.stop()
    print_figures(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["ratio"] >= TARGET_RATIO else 1


def run(conn: redis.Redis, count: int, repeats: int, chunk: int) -> dict[str, Any]:
    settings = FarmSettings(redis_url="redis://unused", secret="bench")
    text = batch_text(count)
    queue = queues.stage_queue(conn, Stage.ENCODE)

    def farm() -> None:
        parsed = batch.parse_batch(text, settings, name="bench")
        outcome = batch.submit_batch(conn, settings, parsed, chunk_size=chunk)
        assert len(outcome.created) == count and not parsed.errors

    def farm_rerun() -> None:
        outcome = batch.submit_batch(conn, settings, batch.parse_batch(text, settings, name="bench"), chunk_size=chunk)
        assert not outcome.created

    def raw_rq(pipeline_size: int) -> Callable[[], None]:
        def go() -> None:
            # The payload queues.enqueue_stage builds for an encode attempt, minus the call signature:
            # signing is part of what the farm costs over raw rq.
            datas = [
                queue.prepare_data(
                    queues.STAGE_ENTRYPOINT,
                    kwargs={"job_id": f"j{i:08d}", "stage": "encode", "attempt": 1, "upstream_attempt": None},
                    job_id=keys.stage_job_id(f"j{i:08d}", Stage.ENCODE, 1),
                    timeout=-1,
                    result_ttl=queues.RESULT_TTL_SECONDS,
                    failure_ttl=queues.FAILURE_TTL_SECONDS,
                    description=f"encode j{i:08d} attempt 1",
                )
                for i in range(count)
            ]
            for offset in range(0, count, pipeline_size):
                pipe = queues.transaction(conn)
                queue.enqueue_many(datas[offset : offset + pipeline_size], pipeline=pipe)
                pipe.execute()

        return go

    def flush() -> None:
        conn.flushall()

    samples: dict[str, list[float]] = {"farm": [], "farm_rerun": [], "raw_rq_one_pipeline": [], "raw_rq_chunked": []}
    for _ in range(repeats):
        samples["farm"].append(time_it(flush, farm))
        assert queue.count == count
        samples["farm_rerun"].append(time_it(lambda: None, farm_rerun))
        samples["raw_rq_one_pipeline"].append(time_it(flush, raw_rq(count)))
        assert queue.count == count
        samples["raw_rq_chunked"].append(time_it(flush, raw_rq(chunk)))
    conn.flushall()

    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = min(medians["raw_rq_one_pipeline"], medians["raw_rq_chunked"])
    return {
        "count": count,
        "repeats": repeats,
        "chunk": chunk,
        "seconds": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "rate_per_second": {name: round(count / seconds) for name, seconds in medians.items()},
        "raw_rq_rate_per_second": round(count / baseline),
        "ratio": round(baseline / medians["farm"], 3),
        "target_ratio": TARGET_RATIO,
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
    }


def print_figures(figures: dict[str, Any]) -> None:
    rates = figures["rate_per_second"]
    count = figures["count"]
    print(f"submitting {count:,} specs (median of {figures['repeats']}, pipelines of {figures['chunk']})")
    rows = [
        ("reelfarm batch (validate + records + enqueue)", "farm"),
        ("reelfarm batch, same file again (all exist)", "farm_rerun"),
        ("raw rq enqueue_many, one pipeline", "raw_rq_one_pipeline"),
        (f"raw rq enqueue_many, pipelines of {figures['chunk']}", "raw_rq_chunked"),
    ]
    for label, name in rows:
        seconds = statistics.median(figures["seconds"][name])
        print(f"  {label:<48} {seconds:7.2f} s  {rates[name]:>8,} specs/s")
    verdict = "meets" if figures["ratio"] >= figures["target_ratio"] else "MISSES"
    print(
        f"ratio farm / raw rq (faster of the two): {figures['ratio']:.2f}x "
        f"({verdict} the {figures['target_ratio']}x target)"
    )


if __name__ == "__main__":
    sys.exit(main())
