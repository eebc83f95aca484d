"""Room state machine against a real Valkey: forward-only, FAILED sticky, one claimer wins."""

from __future__ import annotations

import threading
import time

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.core.descriptors import Descriptor, TensorEntry
from scheduler.core.rooms import Rooms, RoomState


def descriptor(job_id: str = "job1", attempt: int = 1) -> Descriptor:
    now = time.time()
    return Descriptor(
        job_id=job_id,
        producer_stage="encode",
        attempt=attempt,
        producer_id="encode-p1",
        endpoint="127.0.0.1:1",
        slot_base=4096,
        slot_bytes=1024,
        tensors=(TensorEntry(name="x", dtype="uint8", shape=(8,), offset=0, nbytes=8),),
        checksum="c",
        created_at=now,
        lease_expires_at=now + 60,
    )


def test_lifecycle_and_ack_notifies_the_producer(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    rooms = Rooms(conn)
    key = rooms.publish(descriptor(), "sig")
    assert rooms.state(key) is RoomState.PUBLISHED
    assert rooms.claim(key, "c1", lease_seconds=30)
    assert not rooms.claim(key, "c2", lease_seconds=30)
    assert not rooms.mark_transferring(key, "c2"), "only the holder may advance"
    assert rooms.mark_transferring(key, "c1")
    assert rooms.ack(key, "c1", "encode-p1")
    assert rooms.state(key) is RoomState.ACKED
    assert conn.lrange("reelfarm:acks:encode-p1", 0, -1) == [key.encode()]
    assert rooms.fail(key, "late failure") is RoomState.ACKED, "ACKED is final"


def test_failed_is_sticky(redis_url: str) -> None:
    rooms = Rooms(redis.Redis.from_url(redis_url))
    key = rooms.publish(descriptor(), "sig")
    assert rooms.fail(key, "forged signature") is RoomState.FAILED
    assert not rooms.claim(key, "c1", lease_seconds=30)
    assert not rooms.mark_transferring(key, "c1")
    assert rooms.read(key)["reason"] == "forged signature"


def test_expired_claim_can_be_taken_over(redis_url: str) -> None:
    rooms = Rooms(redis.Redis.from_url(redis_url))
    key = rooms.publish(descriptor(), "sig")
    assert rooms.claim(key, "dead-consumer", lease_seconds=0.05)
    time.sleep(0.1)
    assert rooms.claim(key, "c2", lease_seconds=30)
    assert not rooms.ack(key, "dead-consumer", "encode-p1")


def test_racing_consumers_exactly_one_wins(redis_url: str) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=16)
    contenders = 6
    for trial in range(100):
        rooms = Rooms(redis.Redis(connection_pool=pool))
        key = rooms.publish(descriptor(job_id=f"race{trial}"), "sig")
        barrier = threading.Barrier(contenders)
        wins: list[str] = []

        def contend(name: str, key: str = key, barrier: threading.Barrier = barrier, wins: list[str] = wins) -> None:
            mine = Rooms(redis.Redis(connection_pool=pool))
            barrier.wait()
            if mine.claim(key, name, lease_seconds=30):
                wins.append(name)

        threads = [threading.Thread(target=contend, args=(f"c{i}",)) for i in range(contenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, f"trial {trial}: winners {wins}"
        assert rooms.read(key)["claimed_by"] == wins[0]


OPS = st.lists(
    st.tuples(st.sampled_from(["claim", "transferring", "ack", "fail"]), st.sampled_from(["c1", "c2"])),
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_states_never_go_backwards(redis_url: str, ops: list[tuple[str, str]]) -> None:
    rooms = Rooms(redis.Redis.from_url(redis_url))
    key = rooms.publish(descriptor(job_id="prop"), "sig")
    seen = [rooms.state(key)]
    for op, who in ops:
        if op == "claim":
            rooms.claim(key, who, lease_seconds=30)
        elif op == "transferring":
            rooms.mark_transferring(key, who)
        elif op == "ack":
            rooms.ack(key, who, "encode-p1")
        else:
            rooms.fail(key, "reason")
        seen.append(rooms.state(key))
    for before, after in zip(seen, seen[1:], strict=False):
        if before is RoomState.FAILED:
            assert after is RoomState.FAILED
        elif before is RoomState.ACKED:
            assert after is RoomState.ACKED
        elif after is not RoomState.FAILED:
            assert after >= before


def test_eviction_policy_is_checked(redis_url: str) -> None:
    from scheduler.core.connection import eviction_warning

    conn = redis.Redis.from_url(redis_url)
    assert eviction_warning(conn) is None, "the embedded/test server runs with noeviction"
    conn.config_set("maxmemory-policy", "allkeys-lru")
    try:
        warning = eviction_warning(conn)
        assert warning is not None and "allkeys-lru" in warning
    finally:
        conn.config_set("maxmemory-policy", "noeviction")
