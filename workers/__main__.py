"""``python -m workers STAGE``: run one stage worker (what ``reelfarm worker STAGE`` execs)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scheduler.core.keys import Stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reelfarm worker", description="Run one reelfarm stage worker.")
    parser.add_argument("stage", choices=[s.value for s in Stage])
    parser.add_argument(
        "--config", type=Path, default=None, help="farm settings YAML (default: env vars / embedded farm)"
    )
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--models", default=None, help="comma-separated model names to serve (default: all configured)")
    parser.add_argument(
        "--expert",
        choices=["high", "low"],
        default=None,
        help="transform, Wan2.2 two-expert models: load only this expert's DiT and serve its hop (transform@EXPERT)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--decode-ranks", type=int, default=None, help="decode: spread the VAE over N processes (grid: squarest)"
    )
    parser.add_argument("--decode-grid", default=None, help="decode: the ranks' grid over the frame, ROWSxCOLS")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ["REELFARM_METRICS_PORT"]) if os.environ.get("REELFARM_METRICS_PORT") else None,
        help="serve Prometheus metrics on this port (0 = any free port; default: off)",
    )
    args = parser.parse_args(argv)
    from scheduler.core.logging_setup import configure_logging

    configure_logging(args.log_level)
    stage = Stage(args.stage)
    from workers.allocator import return_freed_memory_promptly

    # Before the model loads and any thread starts: the worker lives for many jobs (see workers.allocator).
    return_freed_memory_promptly()

    from scheduler.core.queues import JSONSerializer, worker_queues
    from scheduler.core.settings import load_settings
    from workers.runtime import start_runtime
    from workers.stage_compute import load_all
    from workers.stage_worker import StageWorker, WarmExit

    try:
        settings = load_settings(args.config)
        if args.models:
            chosen = [m.strip() for m in args.models.split(",") if m.strip()]
            settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"models": chosen})})
        if args.expert is not None:
            if stage is not Stage.TRANSFORM:
                raise ValueError("--expert picks a transform worker's Wan2.2 expert; drop it for other stages")
            settings = settings.model_copy(
                update={"worker": settings.worker.model_copy(update={"expert": args.expert})}
            )
        if args.decode_ranks is not None or args.decode_grid is not None:
            from workers.stages.sharded_decode import ShardGrid

            grid = ShardGrid.parse(args.decode_grid) if args.decode_grid else ShardGrid.for_ranks(args.decode_ranks)
            if args.decode_ranks is not None and grid.size != args.decode_ranks:
                raise ValueError(f"--decode-grid {grid} has {grid.size} ranks, not --decode-ranks {args.decode_ranks}")
            worker = settings.worker.model_copy(update={"decode_grid": str(grid)})
            settings = settings.model_copy(update={"worker": worker})
        runtime = start_runtime(stage, settings, load_all)
    except Exception as exc:  # noqa: BLE001 - start-up errors are reported in one line, not a traceback
        print(f"reelfarm worker {stage.value}: cannot start: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        from scheduler.core.worker_metrics import start_metrics_server

        addr = settings.transfer.hostname
        port = start_metrics_server(args.metrics_port, addr=addr)
        runtime.set_status(metrics=f"{addr}:{port}")

    def make_worker() -> StageWorker:
        worker = StageWorker(
            worker_queues(runtime.conn, stage, list(runtime.computes), settings.worker.expert),
            connection=runtime.conn,
            serializer=JSONSerializer,
            name=runtime.worker_id,
        )
        worker.runtime = runtime
        return worker

    try:
        print(f"reelfarm worker {stage.value} {runtime.worker_id} ready at {runtime.engine.endpoint}", flush=True)
        try:
            serve(make_worker, burst=args.burst, log_level=args.log_level)
        except WarmExit:
            pass
        runtime.drain()
    finally:
        runtime.close()
    return 0


def serve(make_worker: Callable[[], Any], burst: bool, log_level: str) -> None:
    """Run rq's work loop, riding out Redis outages instead of exiting (rq quits on errors outside dequeue).

    After an outage a fresh rq worker object is made: the old one's registration may
    have survived in a restarted Redis, and rq refuses to register a live name twice.
    """
    import redis

    log = logging.getLogger("reelfarm.worker")
    while True:
        worker = make_worker()
        try:
            worker.work(burst=burst, logging_level=log_level, with_scheduler=False)
            return
        except redis.ConnectionError as exc:
            log.warning("Redis unavailable (%s); resuming when it is back", exc)
        while True:
            # rq's SIGTERM handler stays installed and marks this worker: shut down, do not wait on Redis.
            if getattr(worker, "_stop_requested", False):
                return
            time.sleep(1.0)
            try:
                worker.connection.ping()
                worker.register_death()
                break
            except redis.RedisError:
                continue


if __name__ == "__main__":
    sys.exit(main())
