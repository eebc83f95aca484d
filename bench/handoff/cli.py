"""``python -m bench.handoff``: the flags, the run and the exit code.

The run starts its own Valkey and producer process and stops both on every way
out: normal end, Ctrl-C, SIGTERM/SIGHUP and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import torch
from rq import Queue

from bench.handoff.engines import (
    CONSUMER_STAGE,
    ProducerProcess,
    bench_runtime,
    bench_settings,
    close_runtime,
    producer_main,
    torch_threads,
)
from bench.handoff.payloads import PAYLOAD_LABELS, PAYLOADS
from bench.handoff.report import (
    RECEIVE_PRIVATE,
    RECEIVE_SLOT,
    library_versions,
    payload_report,
    render_table,
    targets_missed,
)
from bench.handoff.stats import BUSY_MACHINE_CORES, CpuWatch
from bench.handoff.steps import RQ_QUEUE, bench_payload
from scheduler.local.processes import ManagedServer
from scheduler.local.valkey import start_valkey


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` below runs and nothing is left running."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    def progress(message: str) -> None:
        if not args.silent:
            print(message, file=sys.stderr, flush=True)

    payload_names = [p.strip() for p in args.payloads.split(",") if p.strip()]
    unknown = [p for p in payload_names if p not in PAYLOADS]
    if unknown:
        raise SystemExit(f"unknown payload(s) {', '.join(unknown)}: choose from {', '.join(PAYLOADS)}")
    password = secrets.token_urlsafe(24)
    farm_secret = secrets.token_hex(32)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reelfarm-bench-")))
        progress("starting valkey ...")
        server: ManagedServer = start_valkey(tmp / "valkey", None, password)
        stack.callback(server.stop)
        redis_url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        settings = bench_settings(redis_url, farm_secret, direct_receive=args.receive == "auto")
        progress("starting the producer process ...")
        producer = ProducerProcess(redis_url, farm_secret)
        stack.callback(producer.stop)
        rt = bench_runtime(CONSUMER_STAGE, settings)
        stack.callback(close_runtime, rt)
        info: dict[str, Any] = rt.conn.info("server")  # type: ignore[assignment]
        receive = RECEIVE_PRIVATE if rt.engine.reads_into_private_memory else RECEIVE_SLOT
        progress(f"consumer receives into {receive}")
        for name in payload_names:
            progress(f"payload {name} ({PAYLOAD_LABELS[name]}) ...")
            watch = CpuWatch([os.getpid(), producer.proc.pid, server.pid])
            samples = bench_payload(name, rt, producer, rt.conn, args.repeats, args.warmup, progress)
            results[name] = payload_report(samples)
            results[name]["other_processes_cores"] = watch.other_cores()
        with contextlib.suppress(redis.RedisError):
            Queue(RQ_QUEUE, connection=rt.conn).delete(delete_jobs=True)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads_per_process": torch.get_num_threads(),
            "versions": library_versions(info),
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "receive": receive,
        "definitions": {
            "farm": "producer Rooms.publish + consumer workers.handoff.pull_input (claim, verify, mark, pull, verify, ack)",
            "farm_plus_pack": "farm + producer stage_output (acquire slot, pack_tensors copy + checksum, sign)",
            "raw_read": "MooncakeEngine.batch_read of the same spans, alone",
            "farm_overhead_ms": "median over step-by-step hand-offs of (all steps but the batch_read): the farm's cost beyond its own raw read",
            "farm_minus_raw_read_ms": "median(farm) - median(raw_read), unpaired: includes the transport's jitter",
            "redis": "rq Queue.enqueue(tensors) with the default pickle serializer + Job.fetch + job.args",
            "redis_bytes": "informational, not a target: the payload's bytes through one Redis SET + GET (no rq, pickle or zlib)",
            "memcpy": "dst.copy_(src) between preallocated uint8 tensors of the payload's size, caches evicted first",
        },
        "payloads": results,
        "targets_missed": targets_missed(results),
        "busy_payloads": [n for n, p in results.items() if (p["other_processes_cores"] or 0.0) > BUSY_MACHINE_CORES],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.handoff",
        description="Measure the farm's Mooncake hand-off against the rq pickle path and a memcpy.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (5 repeats, 1 warm-up), under a minute")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats per payload (default 40; 5 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured repeats first (default 3; 1 quick)")
    parser.add_argument("--payloads", default=",".join(PAYLOADS), help="comma-separated subset of text,480p,720p")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--receive",
        choices=("auto", "slot"),
        default="auto",
        help="auto: what a worker does (TCP reads into private memory); slot: force the registered receive slot",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--producer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 40
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(torch_threads())
    if args.producer:
        return producer_main()
    command = "python -m bench.handoff " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        with _terminate_as_interrupt():
            report = run(args, command.strip())
    except KeyboardInterrupt:
        print("interrupted; everything the bench started was stopped", file=sys.stderr)
        return 130
    print(render_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.strict and report["targets_missed"] else 0
