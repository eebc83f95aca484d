"""The maintenance loop: notices dead workers within a bounded time and puts their jobs back.

rq alone takes up to ~11 minutes to notice a dead worker and its non-forking
worker does not heartbeat during a job; reelfarm workers heartbeat from a
thread into a key that expires after ``worker_ttl_seconds``. A pass:

1. takes the reaper lock (one pass at a time farm-wide; every worker runs the loop,
   so any live worker can reap the others),
2. for each in-flight stage execution whose worker key expired, restarts the job
   through ``recovery.restart_job`` (or quarantines it past its attempt budget),
3. releases delayed retries whose backoff is over,
4. puts back stage jobs that rq dequeued but no worker started (``queues.requeue_stranded``:
   the connection died between rq's BLMOVE and the start, e.g. in a Redis restart),
5. recounts each stage's demand key for the autoscaler (``demand.refresh_demand``).

Worst-case detection = worker_ttl_seconds + interval (defaults 15 s + 5 s).
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis

from scheduler.core import demand, jobs, keys, queues, recovery, worker_registry
from scheduler.core.job_record import StageField, stage_field

log = logging.getLogger("reelfarm.reaper")

DEFAULT_INTERVAL_SECONDS = 5.0

_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# A dequeued job not started after this long is stranded (a live worker starts one within milliseconds).
DEFAULT_STRANDED_AFTER_SECONDS = 15.0


def reap_once(
    conn: redis.Redis,
    max_attempts: int = recovery.DEFAULT_MAX_ATTEMPTS,
    stranded_after_seconds: float = DEFAULT_STRANDED_AFTER_SECONDS,
    *,
    secret: bytes,
) -> list[str]:
    """One maintenance pass; returns a line per action taken (empty when the lock is held elsewhere)."""
    token = secrets.token_hex(8)
    if not conn.set(keys.reaper_lock_key(), token, nx=True, px=30_000):
        return []
    actions: list[str] = []
    try:
        inflight: list[bytes] = conn.zrange(keys.inflight_key(), 0, -1)  # type: ignore[assignment]
        for raw in inflight:
            member = raw.decode()
            job_id, stage, attempt = keys.parse_inflight_member(member)
            fields = jobs.job_fields(conn, job_id)
            worker_id = fields.get(stage_field(stage, StageField.WORKER), "")
            if worker_id and worker_registry.get_worker(conn, worker_id) is not None:
                continue
            outcome = recovery.restart_job(
                conn,
                job_id,
                stage,
                attempt,
                f"worker {worker_id or '?'} stopped heartbeating",
                max_attempts=max_attempts,
                worker_id=worker_id,
                secret=secret,
            )
            actions.append(f"{member}: {outcome}")
        released = recovery.release_due(conn, secret=secret)
        if released:
            actions.append(f"released {released} delayed retries")
        for rq_job_id in queues.requeue_stranded(conn, stranded_after_seconds):
            actions.append(f"{rq_job_id}: dequeued but never started; put back on its queue")
        # Last, so the counts include what this pass put back.
        demand.refresh_demand(conn, queues.stage_backlog(conn))
    finally:
        conn.eval(_UNLOCK, 1, keys.reaper_lock_key(), token)
    for line in actions:
        log.warning("reaper: %s", line)
    return actions


class ReaperThread(threading.Thread):
    """Runs ``reap_once`` every ``interval`` seconds until stopped; errors are logged, never fatal."""

    def __init__(
        self,
        conn: redis.Redis,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        max_attempts: int = 3,
        stranded_after_seconds: float = DEFAULT_STRANDED_AFTER_SECONDS,
        *,
        secret: bytes,
    ) -> None:
        super().__init__(name="reaper", daemon=True)
        self.conn = conn
        self.interval = interval
        self.max_attempts = max_attempts
        self.stranded_after_seconds = stranded_after_seconds
        # Restarts the reaper enqueues are signed like any other stage call.
        self.secret = secret
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap_once(self.conn, self.max_attempts, self.stranded_after_seconds, secret=self.secret)
            except redis.RedisError as exc:
                log.warning("reaper pass failed: %s", exc)
            except Exception:  # noqa: BLE001 - a bad record must not stop maintenance for the whole farm
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()
