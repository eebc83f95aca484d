"""Registered workers: who serves which stage, at which transfer endpoint, and whether it is alive.

A worker's hash expires unless its heartbeat thread refreshes it, so "live" is
simply "the key exists". Consumers look a producer's endpoint up here and never
trust the endpoint a descriptor claims on its own.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from scheduler.core import keys


def register_worker(conn: redis.Redis, worker_id: str, info: dict[str, str], ttl_seconds: int) -> None:
    fields: dict[Any, Any] = {**info, "worker_id": worker_id, "last_heartbeat": repr(time.time())}
    key = keys.worker_key(worker_id)
    pipe = conn.pipeline()
    pipe.hset(key, mapping=fields)
    pipe.expire(key, ttl_seconds)
    pipe.sadd(keys.workers_index_key(), worker_id)
    pipe.execute()


# Refresh only a complete record (one with an endpoint): recreating a partial one would make consumers
# see a registered producer they cannot verify, and the reaper a live worker that never expires.
# A worker whose heartbeat finds no complete record re-registers the whole record.
_HEARTBEAT = """
if redis.call('HEXISTS', KEYS[1], 'endpoint') == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Field updates between heartbeats, under the same rule: never create a record, only change a live one.
_UPDATE_LIVE = """
if redis.call('HEXISTS', KEYS[1], 'endpoint') == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

_INCREMENT_LIVE = """
if redis.call('HEXISTS', KEYS[1], 'endpoint') == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def heartbeat(conn: redis.Redis, worker_id: str, ttl_seconds: int, fields: dict[str, str] | None = None) -> bool:
    """Refresh liveness; False when the record had expired or vanished (the caller re-registers)."""
    update = {**(fields or {}), "last_heartbeat": repr(time.time())}
    args: list[str | int] = [ttl_seconds]
    for name, value in update.items():
        args += [name, value]
    return bool(conn.eval(_HEARTBEAT, 1, keys.worker_key(worker_id), *args))


def update_worker(conn: Any, worker_id: str, fields: dict[str, str]) -> Any:
    """Change fields of a live record (False, nothing written, when it expired); joins a pipeline too."""
    args = [part for item in fields.items() for part in item]
    return conn.eval(_UPDATE_LIVE, 1, keys.worker_key(worker_id), *args)


def increment(conn: Any, worker_id: str, field: str, amount: int = 1) -> Any:
    """Add to a counter of a live record (nothing written when it expired); joins a pipeline too."""
    return conn.eval(_INCREMENT_LIVE, 1, keys.worker_key(worker_id), field, amount)


def deregister_worker(conn: redis.Redis, worker_id: str) -> None:
    pipe = conn.pipeline()
    pipe.delete(keys.worker_key(worker_id))
    pipe.srem(keys.workers_index_key(), worker_id)
    pipe.execute()


def get_worker(conn: redis.Redis, worker_id: str) -> dict[str, str] | None:
    raw: dict[bytes, bytes] = conn.hgetall(keys.worker_key(worker_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()} or None


# Forget an expired worker -- unless it re-registered since it was read: a plain SREM after the read
# could drop the id of a worker whose heartbeat just put its record back, and its heartbeats (which
# refresh the record only) would never re-add it, hiding a live worker from every listing.
# KEYS: worker record, index. ARGV: worker id.
_FORGET_IF_EXPIRED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


def live_workers(conn: redis.Redis) -> list[dict[str, str]]:
    ids = sorted(m.decode() for m in conn.smembers(keys.workers_index_key()))  # type: ignore[union-attr]
    alive = []
    for worker_id in ids:
        record = get_worker(conn, worker_id)
        if record is None:
            # Expired: forget it so the index does not grow with every restart.
            conn.eval(_FORGET_IF_EXPIRED, 2, keys.worker_key(worker_id), keys.workers_index_key(), worker_id)
        else:
            alive.append(record)
    return alive
