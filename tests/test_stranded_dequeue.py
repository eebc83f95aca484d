"""A stage job that rq dequeued but no worker started is put back, and one attempt never runs twice.

Driven by hand against a real Valkey: rq's dequeue is a BLMOVE into the queue's
intermediate list, which these tests make with the same LMOVE, then the reaper's
``requeue_stranded`` pass runs with explicit clocks.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import redis
from rq import Queue

from scheduler.core import jobs, keys, queues, reaper, reconcile
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from scheduler.intake.submit import submit

TINY: dict[str, Any] = {"prompt": "a heron in the reeds", "width": 64, "height": 48, "frames": 17, "steps": 2}


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def settings(redis_url: str) -> FarmSettings:
    return FarmSettings(redis_url=redis_url, secret=secrets.token_hex(8))


@pytest.fixture
def job_id(conn: redis.Redis, settings: FarmSettings) -> str:
    return submit(conn, settings, TINY)


def strand(conn: redis.Redis) -> tuple[Queue, str]:
    """What a worker's dequeue does before the connection dies: move the head id into the intermediate list."""
    queue = queues.stage_queue(conn, Stage.ENCODE)
    rq_job_id: bytes | None = conn.lmove(queue.key, queue.intermediate_queue_key)  # type: ignore[assignment]
    assert rq_job_id is not None
    return queue, rq_job_id.decode()


def test_a_stranded_dequeue_goes_back_to_the_front_after_two_passes(
    conn: redis.Redis, settings: FarmSettings, job_id: str
) -> None:
    submit(conn, settings, {**TINY, "seed": 7})  # a job behind it
    queue, rq_job_id = strand(conn)
    assert rq_job_id == keys.stage_job_id(job_id, Stage.ENCODE, 1)
    assert queue.count == 1

    assert queues.requeue_stranded(conn, 15.0, now=1000.0) == []  # first seen
    assert queues.requeue_stranded(conn, 15.0, now=1010.0) == []  # not old enough: a slow start is not stranded
    assert queues.requeue_stranded(conn, 15.0, now=1016.0) == [rq_job_id]

    assert conn.llen(queue.intermediate_queue_key) == 0
    assert queue.job_ids[0] == rq_job_id  # front: it was next before it was stranded
    assert queue.count == 2
    assert not conn.exists(keys.stranded_seen_key(queue.name, rq_job_id))


def test_a_dequeue_that_starts_between_passes_is_left_alone(conn: redis.Redis, job_id: str) -> None:
    queue, rq_job_id = strand(conn)
    assert queues.requeue_stranded(conn, 15.0, now=1000.0) == []
    conn.lrem(queue.intermediate_queue_key, 1, rq_job_id)  # rq's start takes it out of the intermediate list
    assert queues.requeue_stranded(conn, 15.0, now=1100.0) == []
    assert queue.count == 0


def test_the_reaper_pass_requeues_stranded_jobs(conn: redis.Redis, job_id: str) -> None:
    queue, rq_job_id = strand(conn)
    assert reaper.reap_once(conn, stranded_after_seconds=0.0, secret=b"reaper") == []
    actions = reaper.reap_once(conn, stranded_after_seconds=0.0, secret=b"reaper")
    assert actions == [f"{rq_job_id}: dequeued but never started; put back on its queue"]
    assert queue.job_ids == [rq_job_id]


def test_one_attempt_starts_once(conn: redis.Redis, job_id: str) -> None:
    assert not jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "encode-a", 2)  # not the queued attempt
    assert not jobs.mark_stage_started(conn, job_id, Stage.TRANSFORM, "transform-a", 1)  # no such attempt yet
    assert jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "encode-a", 1)
    assert not jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "encode-b", 1)  # a second copy of attempt 1
    fields = jobs.job_fields(conn, job_id)
    assert fields["encode.worker"] == "encode-a" and fields["state"] == "running"
    assert conn.zscore(keys.inflight_key(), keys.inflight_member(job_id, Stage.ENCODE, 1)) is not None


def test_a_cancelled_job_does_not_start(conn: redis.Redis, job_id: str) -> None:
    conn.hset(keys.job_key(job_id), "state", "cancelled")
    assert not jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "encode-a", 1)


def test_a_batch_mate_claimed_but_never_started_goes_back_and_one_claim_wins(
    conn: redis.Redis, settings: FarmSettings, job_id: str
) -> None:
    """A transform worker takes batch-mates by id (``queues.claim_queued``); a crash before their start
    leaves them to the reaper like any dequeue, and two workers claiming one id cannot both get it."""
    behind = submit(conn, settings, {**TINY, "seed": 7})
    queue = queues.stage_queue(conn, Stage.ENCODE)
    mate = keys.stage_job_id(behind, Stage.ENCODE, 1)

    assert queues.claim_queued(conn, queue, mate)
    assert not queues.claim_queued(conn, queue, mate)  # another worker's claim of the same id
    assert queue.job_ids == [keys.stage_job_id(job_id, Stage.ENCODE, 1)]
    assert queues.requeue_stranded(conn, 15.0, now=1000.0) == []
    assert queues.requeue_stranded(conn, 15.0, now=1016.0) == [mate]
    assert queue.job_ids[0] == mate

    assert queues.claim_queued(conn, queue, mate)
    queues.mark_claimed_started(conn, queue, mate)  # started: the in-flight record covers it from here
    assert queues.requeue_stranded(conn, 15.0, now=2000.0) == []
    assert queues.requeue_stranded(conn, 15.0, now=2100.0) == []
    assert mate not in queue.job_ids


def test_a_call_popped_before_a_failover_is_queued_again_once_the_server_changed(
    conn: redis.Redis, settings: FarmSettings, job_id: str
) -> None:
    secret = settings.require_secret()
    assert reconcile.requeue_lost_calls(conn, secret=secret) == [], "the first pass only learns the server"
    queue = queues.stage_queue(conn, Stage.ENCODE)
    # rq's BLPOP over a stage's priorities took the call, then the worker lost its connection for good.
    assert conn.lpop(queue.key) == keys.stage_job_id(job_id, Stage.ENCODE, 1).encode()
    assert reaper.reap_once(conn, secret=secret) == [], "the same server: nothing was lost to a failover"
    conn.set(keys.server_run_key(), "the-old-primary")  # what the promoted replica holds
    actions = reaper.reap_once(conn, secret=secret)
    assert actions == [f"{job_id}: its queued stage call was lost in a failover; queued again"]
    assert queue.job_ids == [keys.stage_job_id(job_id, Stage.ENCODE, 1)]
    assert reaper.reap_once(conn, secret=secret) == [], "once per server change, and nothing held twice"
