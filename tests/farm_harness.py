"""A farm made of real parts for integration tests: real Valkey, real S3 server, real worker processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis

from scheduler.core import jobs
from scheduler.core.keys import Hop, Stage
from scheduler.core.settings import FarmSettings, S3Settings, TransferSettings, WorkerSettings
from scheduler.local.embedded import WorkerSlot, start_worker, wait_for_workers

# A test's workers get this long, all together, to stop after SIGTERM; then they are killed. An idle worker
# stops in 1-3 s; one still holding a hand-off nobody will pull (its consumer already stopped) would wait
# out the lease first -- 20 s of every such test's teardown, with nothing left to check once the test is over.
STOP_GRACE_SECONDS = 5.0


def stop_workers(procs: list[subprocess.Popen[bytes]], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every worker, then SIGKILL what is left after ``grace``: the worker and its rank processes
    (a decode or DiT group's followers share its process group: ``start_worker`` makes each a session leader)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def farm_settings(redis_url: str, s3: Any, model_dir: Path, home: Path, **overrides: Any) -> FarmSettings:
    base = FarmSettings(
        redis_url=redis_url,
        model_dir=model_dir,
        secret=secrets.token_hex(16),
        home=home,
        s3=S3Settings(
            endpoint_url=s3.endpoint_url, bucket=s3.bucket, access_key=s3.access_key, secret_key=s3.secret_key
        ),
        transfer=TransferSettings(slots=2, slot_mb=4),
        worker=WorkerSettings(
            heartbeat_seconds=0.5,
            worker_ttl_seconds=4,
            lease_seconds=60,
            reaper_interval_seconds=1.0,
            retry_backoff_seconds=0.2,
        ),
    )
    return base.model_copy(update=overrides)


@contextmanager
def running_workers(
    settings: FarmSettings, stages: list[Stage] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    stages = stages or list(Stage)
    log_dir = settings.home / "logs"
    procs = [start_worker(stage, settings, log_dir) for stage in stages]
    try:
        wait_for_workers(settings, stages, procs, log_dir)
        yield procs
    finally:
        stop_workers(procs)


def wait_finished(conn: redis.Redis, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = jobs.read_status(conn, job_id)
        if jobs.JobState(record["state"]).finished:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {jobs.read_status(conn, job_id)}")


def worker_logs(settings: FarmSettings) -> str:
    log_dir = settings.home / "logs"
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))


class WorkerFleet:
    """Worker processes a test starts, kills and replaces one by one; all stopped at the end."""

    def __init__(self, settings: FarmSettings, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.extra_env = extra_env or {}
        # Keyed by hop: a transform worker holding one Wan2.2 expert is ``transform@high`` / ``transform@low``.
        self.procs: list[tuple[Hop, subprocess.Popen[bytes]]] = []

    def start(self, *stages: Stage) -> list[subprocess.Popen[bytes]]:
        log_dir = self.settings.home / "logs"
        started = [start_worker(stage, self.settings, log_dir, self.extra_env) for stage in stages]
        self.procs.extend(zip(stages, started, strict=True))
        wait_for_workers(self.settings, list(stages), started, log_dir)
        return started

    def start_expert(self, expert: str) -> subprocess.Popen[bytes]:
        """A transform worker loading only ``expert``'s DiT (``--expert``), serving ``transform@EXPERT``."""
        log_dir = self.settings.home / "logs"
        slot = WorkerSlot(Stage.TRANSFORM, 0, expert=expert)
        proc = start_worker(Stage.TRANSFORM, self.settings, log_dir, self.extra_env, slot=slot)
        self.procs.append((Hop(f"transform@{expert}"), proc))
        wait_for_workers(self.settings, [Stage.TRANSFORM], [proc], log_dir)
        return proc

    def live(self, stage: Hop) -> list[subprocess.Popen[bytes]]:
        return [p for s, p in self.procs if s == stage and p.poll() is None]

    def all_alive(self) -> bool:
        return all(p.poll() is None for _, p in self.procs)

    def respawn(self, stage: Stage) -> bool:
        """As a supervisor (systemd, Kubernetes) would: if no worker of ``stage`` lives, forget the dead ones
        and start a new one. True if it started one."""
        if self.live(stage):
            return False
        self.procs = [(s, p) for s, p in self.procs if s != stage]
        self.start(stage)
        return True

    def worker(self, stage: Hop) -> subprocess.Popen[bytes]:
        """The stage's one live worker process."""
        live = self.live(stage)
        assert len(live) == 1, f"expected one live {stage} worker, found {len(live)}"
        return live[0]

    def worker_pid(self, stage: Hop) -> int:
        return self.worker(stage).pid

    def sigkill(self, stage: Hop) -> None:
        """Kill the stage's live worker as an OOM kill would (no cleanup), and forget it."""
        victim = self.worker(stage)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.procs = [(s, p) for s, p in self.procs if p is not victim]

    def stop_all(self) -> None:
        stop_workers([proc for _, proc in self.procs])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until ``predicate()`` is truthy; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
