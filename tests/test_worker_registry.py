"""Worker records: only a complete record is refreshed or updated, so an expired worker never comes back half-made."""

from __future__ import annotations

import pytest
import redis

from scheduler.core import keys, worker_registry

RECORD = {"stage": "encode", "endpoint": "127.0.0.1:15001", "state": "idle", "jobs_done": "4"}


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_heartbeat_refreshes_a_complete_record(conn: redis.Redis) -> None:
    worker_registry.register_worker(conn, "encode-a", RECORD, ttl_seconds=5)
    conn.expire(keys.worker_key("encode-a"), 1)
    assert worker_registry.heartbeat(conn, "encode-a", 30, {"free_slots": "1"})
    assert conn.ttl(keys.worker_key("encode-a")) > 20
    assert worker_registry.get_worker(conn, "encode-a")["free_slots"] == "1"  # type: ignore[index]


def test_heartbeat_never_recreates_an_expired_or_partial_record(conn: redis.Redis) -> None:
    assert not worker_registry.heartbeat(conn, "gone", 30, {"free_slots": "1"})
    assert not conn.exists(keys.worker_key("gone"))
    conn.hset(keys.worker_key("partial"), mapping={"state": "busy"})  # what an unguarded update would leave
    assert not worker_registry.heartbeat(conn, "partial", 30)
    assert conn.ttl(keys.worker_key("partial")) == -1  # untouched: the caller re-registers the whole record


def test_updates_change_live_records_and_create_nothing(conn: redis.Redis) -> None:
    assert not worker_registry.update_worker(conn, "gone", {"state": "busy", "current_job": "j1"})
    assert not worker_registry.increment(conn, "gone", "jobs_done")
    assert not conn.exists(keys.worker_key("gone")), "a record without endpoint and TTL would never expire"

    worker_registry.register_worker(conn, "encode-a", RECORD, ttl_seconds=30)
    assert worker_registry.update_worker(conn, "encode-a", {"state": "busy", "current_job": "j1"})
    pipe = conn.pipeline(transaction=True)
    worker_registry.increment(pipe, "encode-a", "jobs_done")
    pipe.execute()
    record = worker_registry.get_worker(conn, "encode-a")
    assert record is not None
    assert (record["state"], record["current_job"], record["jobs_done"]) == ("busy", "j1", "5")
    assert conn.ttl(keys.worker_key("encode-a")) > 0


def test_listing_forgets_expired_workers_but_never_one_that_re_registered_meanwhile(
    conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_registry.register_worker(conn, "encode-gone", RECORD, ttl_seconds=30)
    worker_registry.register_worker(conn, "encode-back", RECORD, ttl_seconds=30)
    conn.delete(keys.worker_key("encode-gone"))
    # "encode-back" is read as expired, then its heartbeat puts the record back before the listing forgets it
    # (every worker's maintenance pass lists workers, so this interleaving happens under load).
    real_get = worker_registry.get_worker
    monkeypatch.setattr(
        worker_registry, "get_worker", lambda c, wid: None if wid == "encode-back" else real_get(c, wid)
    )
    assert worker_registry.live_workers(conn) == []
    members = {m.decode() for m in conn.smembers(keys.workers_index_key())}  # type: ignore[union-attr]
    assert members == {"encode-back"}, "a live worker was dropped from the index: no listing would show it again"
    monkeypatch.undo()
    assert [w["worker_id"] for w in worker_registry.live_workers(conn)] == ["encode-back"]
