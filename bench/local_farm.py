"""A farm of real parts for the farm benchmarks: Valkey and a SeaweedFS S3 server in a temporary folder,
stage workers started with the embedded farm's own planner and launcher, everything stopped on the way out.

Benchmarks measure what an operator runs, so the workers here are the same ``python -m workers STAGE``
processes ``reelfarm up`` starts, with the same thread plan (`scheduler.local.embedded.plan_workers`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from scheduler.core import jobs
from scheduler.core.connection import connect_redis
from scheduler.core.job_record import JobState, read_records
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings, S3Settings
from scheduler.local.embedded import WorkerSlot, plan_workers, start_worker, wait_for_workers
from scheduler.local.processes import stop_child
from scheduler.local.seaweedfs import start_s3_server
from scheduler.local.valkey import start_valkey


@contextmanager
def farm_servers(home: Path, model_dir: Path, **overrides: Any) -> Iterator[FarmSettings]:
    """Valkey + S3 on loopback under ``home``; settings for a farm serving ``model_dir`` (no workers yet)."""
    # A bench stopped with SIGTERM (timeout, Ctrl-C in a wrapper) still stops its servers and workers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    password = secrets.token_hex(16)
    access_key, secret_key = "reelfarm", secrets.token_hex(16)
    valkey = start_valkey(home / "valkey", None, password)
    s3 = None
    try:
        s3 = start_s3_server(home / "s3", None, access_key, secret_key)
        settings = FarmSettings(
            redis_url=f"redis://:{password}@127.0.0.1:{valkey.port}/0",
            secret=secrets.token_hex(32),
            home=home,
            model_dir=model_dir,
            s3=S3Settings(endpoint_url=s3.url, access_key=access_key, secret_key=secret_key),
        )
        yield settings.model_copy(update=overrides)
    finally:
        if s3 is not None:
            s3.stop()
        valkey.stop()


def layout_of(text: str) -> tuple[dict[Stage, int], int | None]:
    """``"1:2:1"`` -> encode 1, transform 2, decode 1 (threads as planned); ``"1:1:1x1"``: DiT threads forced to 1."""
    counts_text, _, dit_threads = text.partition("x")
    counts = [int(part) for part in counts_text.split(":")]
    if len(counts) != len(Stage) or min(counts) < 1:
        raise ValueError(f"a layout is three worker counts, encode:transform:decode, each >= 1 (got {text!r})")
    return dict(zip(Stage, counts, strict=True)), int(dit_threads) if dit_threads else None


@contextmanager
def running_layout(
    settings: FarmSettings, layout: dict[Stage, int], dit_threads: int | None = None
) -> Iterator[list[WorkerSlot]]:
    """Workers for ``layout`` planned as ``reelfarm up`` plans them (``dit_threads`` overrides the DiT's)."""
    slots = plan_workers(layout, sorted(os.sched_getaffinity(0)))
    if dit_threads is not None:
        slots = [replace(s, threads=dit_threads) if s.stage is Stage.TRANSFORM else s for s in slots]
    log_dir = settings.home / "logs"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [start_worker(slot.stage, settings, log_dir, slot=slot) for slot in slots]
        wait_for_workers(settings, list(layout), procs, log_dir)
        yield slots
    finally:
        for proc in procs:
            stop_child(proc, timeout=30.0)


def build_model(arch: str, model_dir: Path) -> Path:
    """``reelfarm model build model_dir --arch arch`` (deterministic random weights), in a child process."""
    command = [sys.executable, "-m", "workers.models", "build", str(model_dir), "--arch", arch]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return model_dir


def wait_all_finished(conn: redis.Redis, job_ids: Sequence[str], timeout: float) -> list[dict[str, str]]:
    """Every job's full record once all have finished; raises naming the first one that did not."""
    deadline = time.monotonic() + timeout
    while True:
        records = [record or {} for _, record in read_records(conn, list(job_ids))]
        if all(JobState(r.get("state") or "queued").finished for r in records if r):
            failed = [
                (job_id, r.get("error"))
                for job_id, r in zip(job_ids, records, strict=True)
                if r.get("state") != "succeeded"
            ]
            if failed:
                raise RuntimeError(f"{len(failed)} bench jobs did not succeed, e.g. {failed[0]}")
            return [{k: v for k, v in r.items() if v is not None} for r in records]
        if time.monotonic() > deadline:
            pending = next(
                j for j, r in zip(job_ids, records, strict=True) if not JobState(r.get("state") or "queued").finished
            )
            raise TimeoutError(
                f"bench job {pending} did not finish in {timeout:.0f}s: {jobs.read_status(conn, pending)}"
            )
        time.sleep(0.05)


def connect(settings: FarmSettings) -> redis.Redis:
    return connect_redis(settings)


def arch_job_shape(arch: str) -> dict[str, int]:
    """The job shape (width, height, frames, steps) the preset ``arch`` is made for."""
    from workers.models.presets import arch_named  # the bench may load the data plane; the CLI never does

    return dict(arch_named(arch).job)
