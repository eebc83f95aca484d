"""Idle farm load per worker: Redis commands/s an idle farm of N zero-compute workers sends, per worker.

Run: ``python -m bench.idle_load [--workers 3,30,90] [--seconds 10]``.

The same zero-compute workers as ``bench.control_plane`` (``bench.zero_stage``: heartbeats, rq's blocking
dequeues, ack listeners, the maintenance loop), no jobs. With farm-wide maintenance held by one lease
holder (``scheduler.core.reaper``) the per-worker figure stays flat as the farm grows; when every worker
made its own pass over every worker record it grew with the worker count. Measured over whole reaper
intervals (``--seconds`` is rounded up to a multiple of one), after the workers settled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from bench.control_plane import SETTLE_SECONDS, bench_valkey, idle_load, layout_for, zero_workers
from bench.local_farm import connect
from scheduler.core.settings import FarmSettings


def measure(settings: FarmSettings, workers: int, seconds: float) -> dict[str, float | str]:
    conn = connect(settings)
    conn.flushall()
    with zero_workers(settings, layout_for(workers)):
        time.sleep(SETTLE_SECONDS + settings.worker.reaper_interval_seconds)
        idle = idle_load(conn, seconds)
    return {
        "workers": workers,
        "calls_per_s": idle["calls_per_s"],
        "calls_per_s_per_worker": idle["calls_per_s"] / workers,
        "redis_main_cores": idle["redis_main_cores"],
        "top": idle["top"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_load", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="3,30,90", help="worker process counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured span per worker count")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.workers.split(",") if part.strip()]
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-idle-") as tmp_name:
        tmp = Path(tmp_name)
        with bench_valkey(tmp, tmp) as settings:
            interval = settings.worker.reaper_interval_seconds
            seconds = math.ceil(args.seconds / interval) * interval
            rows = [measure(settings, count, seconds) for count in counts]
    print("| workers | idle commands/s | per worker | Redis main thread | busiest |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workers']} | {row['calls_per_s']:.0f} | {row['calls_per_s_per_worker']:.2f} "
            f"| {float(row['redis_main_cores']):.1%} | {row['top']} |"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
