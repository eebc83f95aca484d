"""The maintenance loop: notices dead workers within a bounded time and puts their jobs back.

rq alone takes up to ~11 minutes to notice a dead worker and its non-forking
worker does not heartbeat during a job; reelfarm workers heartbeat from a
thread into a key that expires after ``worker_ttl_seconds``. A pass:

1. holds the farm-wide maintenance lease (``MaintenanceLease``): every worker runs the loop, but only
   the lease holder makes passes; the others only try to take the lease (one command an interval), so
   an idle farm's maintenance load grows linearly with its workers, not with their square,
2. for each in-flight stage execution whose worker key expired, restarts the job
   through ``recovery.restart_job`` (or quarantines it past its attempt budget),
3. releases delayed retries whose backoff is over,
4. puts back stage jobs that rq dequeued but no worker started (``queues.requeue_stranded``:
   the connection died between rq's BLMOVE and the start, e.g. in a Redis restart),
5. after a failover (another server answers), queues again the stage calls the records say are queued
   but no queue holds (``reconcile.requeue_lost_calls``),
6. recounts each stage's demand key for the autoscaler (``demand.refresh_demand``).

Worst-case detection = worker_ttl_seconds + interval (defaults 15 s + 5 s), also when the dead worker
held the lease: the lease lives ``worker_ttl_seconds`` past its last renewal (renewed every pass), so the
next live worker to try takes it over at most one interval after it lapsed, by which time the dead
worker's own key has expired too. A pass that outlives the lease may overlap the next holder's first one;
every action of a pass is fenced (WATCH on the record, attempt counters, Lua moves), so that is harmless.
"""

from __future__ import annotations

import logging
import secrets
import threading

import redis

from scheduler.core import demand, jobs, keys, queues, reconcile, recovery, worker_registry
from scheduler.core.job_record import StageField, stage_field

log = logging.getLogger("reelfarm.reaper")

DEFAULT_INTERVAL_SECONDS = 5.0

_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# KEYS: lease. ARGV: holder, ttl ms. Renews the holder's own lease, or takes a free one: 1 held, 0 held elsewhere.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""


class MaintenanceLease:
    """The farm-wide maintenance lease in Redis (``keys.reaper_lock_key``): one holder, renewed by its passes,
    taken over by any other worker once it lapses (its holder died or stopped renewing)."""

    def __init__(self, conn: redis.Redis, holder: str, ttl_seconds: float) -> None:
        self.conn = conn
        self.holder = holder
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self._hold = conn.register_script(_HOLD)

    def hold(self) -> bool:
        """Renew the lease if this process holds it, else take it if free; True while this process holds it."""
        return bool(self._hold(keys=[keys.reaper_lock_key()], args=[self.holder, self.ttl_ms]))

    def holder_now(self) -> str | None:
        value = self.conn.get(keys.reaper_lock_key())
        return value.decode() if isinstance(value, bytes) else None

    def release(self) -> None:
        """Give the lease up (a worker stopping cleanly), so the next worker to try takes it at once."""
        self.conn.eval(_UNLOCK, 1, keys.reaper_lock_key(), self.holder)


# A dequeued job not started after this long is stranded (a live worker starts one within milliseconds).
DEFAULT_STRANDED_AFTER_SECONDS = 15.0


def reap_once(
    conn: redis.Redis,
    max_attempts: int = recovery.DEFAULT_MAX_ATTEMPTS,
    stranded_after_seconds: float = DEFAULT_STRANDED_AFTER_SECONDS,
    *,
    secret: bytes,
    lease: MaintenanceLease | None = None,
) -> list[str]:
    """One maintenance pass; returns a line per action taken (empty when the lease is held elsewhere).

    With ``lease`` (the worker loop) the pass runs only while this process holds it and keeps it afterwards;
    without one (a one-off pass: tests, an operator) it takes a short lease for the pass and gives it back.
    """
    one_off = lease is None
    if lease is None:
        lease = MaintenanceLease(conn, f"pass-{secrets.token_hex(8)}", 30.0)
    if not lease.hold():
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
        for job_id in reconcile.requeue_lost_calls(conn, secret=secret):
            actions.append(f"{job_id}: its queued stage call was lost in a failover; queued again")
        # Last, so the counts include what this pass put back.
        demand.refresh_demand(conn, queues.stage_backlog(conn))
    finally:
        if one_off:
            lease.release()
    for line in actions:
        log.warning("reaper: %s", line)
    return actions


class ReaperThread(threading.Thread):
    """Every ``interval`` seconds: a ``reap_once`` pass while this worker holds the maintenance lease, else one
    try to take it. Errors are logged, never fatal; ``stop`` gives the lease up."""

    def __init__(
        self,
        conn: redis.Redis,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        max_attempts: int = 3,
        stranded_after_seconds: float = DEFAULT_STRANDED_AFTER_SECONDS,
        *,
        secret: bytes,
        holder: str,
        lease_seconds: float,
    ) -> None:
        super().__init__(name="reaper", daemon=True)
        self.conn = conn
        self.interval = interval
        self.max_attempts = max_attempts
        self.stranded_after_seconds = stranded_after_seconds
        # Restarts the reaper enqueues are signed like any other stage call.
        self.secret = secret
        # ``worker_ttl_seconds`` keeps the takeover of a dead holder within the dead-worker bound (module docstring).
        self.lease = MaintenanceLease(conn, holder, lease_seconds)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap_once(
                    self.conn, self.max_attempts, self.stranded_after_seconds, secret=self.secret, lease=self.lease
                )
            except redis.RedisError as exc:
                log.warning("reaper pass failed: %s", exc)
            except Exception:  # noqa: BLE001 - a bad record must not stop maintenance for the whole farm
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()
        try:
            self.lease.release()
        except redis.RedisError as exc:
            log.warning("could not give the maintenance lease up (%s); it lapses by itself", exc)
