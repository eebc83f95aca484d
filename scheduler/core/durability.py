"""Writes that must survive a Redis failover wait for a replica before the farm acknowledges them.

Replication is asynchronous: a primary that dies takes its last writes with it, and Sentinel promotes a
replica that never saw them. The farm's acknowledged writes -- a job's creation (submit, batch
submission), a stage's hand-off commit, a job's finish -- are each followed by ``confirm``:

1. one pipeline on one connection: a fence write (``INCR`` of ``keys.durability_fence_key``), then
   ``WAIT 1 timeout``. WAIT counts the replicas that acknowledged everything up to *its connection's*
   last write; the fence is written after the confirmed write returned, so it covers that write
   whichever pooled connection carried it;
2. fewer replicas than asked within ``redis_wait_timeout_seconds``: logged with what it was for, counted
   in ``keys.durability_timeouts_key`` (by kind; ``reelfarm_replication_wait_timeouts``), and False --
   never silently taken as durable.

``redis_durability``: ``replica`` (the default) waits while the server has a replica (``INFO
replication``, re-read at most every ``REPLICAS_RECHECK_SECONDS`` per client); a server with none has
nothing to wait for. ``local`` never waits. A failover that loses a write nobody waited for (a stage
start, a progress step) is reconciled from the records: the reaper restarts what lost its worker and
puts back what was dequeued but never started, and attempt fencing keeps it to one video.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

import redis

from scheduler.core import keys
from scheduler.core.settings import FarmSettings

log = logging.getLogger("reelfarm.durability")

REPLICAS_RECHECK_SECONDS = 10.0

_replicas_seen: weakref.WeakKeyDictionary[Any, tuple[float, int]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def replicas_of(conn: redis.Redis, now: float | None = None) -> int:
    """How many replicas the server says are connected (cached per client for ``REPLICAS_RECHECK_SECONDS``)."""
    now = time.monotonic() if now is None else now
    with _lock:
        seen = _replicas_seen.get(conn)
    if seen is not None and now - seen[0] < REPLICAS_RECHECK_SECONDS:
        return seen[1]
    try:
        count = int(conn.info("replication").get("connected_slaves", 0))
    except redis.ResponseError:
        count = 0  # INFO disabled (some managed Redis): nothing to go on, so nothing to wait for
    with _lock:
        _replicas_seen[conn] = (now, count)
    return count


def confirm(conn: redis.Redis, settings: FarmSettings, what: str) -> bool:
    """Wait until a replica has every write this process made so far; True when it has (or ``redis_durability``
    is local, or there is no replica). ``what`` names the write for the report (``submit``, ``hand-off``, ...)."""
    timeout_seconds = settings.redis_wait_timeout_seconds
    if settings.redis_durability == "local" or replicas_of(conn) == 0:
        return True
    pipe = conn.pipeline(transaction=False)
    pipe.incr(keys.durability_fence_key())
    pipe.execute_command("WAIT", 1, max(1, int(timeout_seconds * 1000)))
    _, acknowledged = pipe.execute()
    if int(acknowledged) >= 1:
        return True
    log.warning(
        "%s: no replica acknowledged the write within %.1fs (redis_durability replica): a failover now would lose it",
        what,
        timeout_seconds,
    )
    conn.hincrby(keys.durability_timeouts_key(), what, 1)
    with _lock:
        # The replica may be gone for good (promoted in a failover): read INFO again next time.
        _replicas_seen.pop(conn, None)
    return False


def timeout_counts(conn: redis.Redis) -> dict[str, int]:
    """Replication waits that timed out, by kind of write, since the farm began."""
    raw: dict[bytes, bytes] = conn.hgetall(keys.durability_timeouts_key())  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}
