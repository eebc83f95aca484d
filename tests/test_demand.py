"""Each stage's demand key: what KEDA's redis trigger reads (LLEN) to scale a stage's workers."""

from __future__ import annotations

import json

import redis

from scheduler.core import demand, keys, queues, reaper, worker_registry
from scheduler.core.keys import Stage

SECRET = b"demand-test-secret"


def test_stage_of_queue_covers_every_model_and_priority() -> None:
    for stage in Stage:
        for priority in keys.PRIORITIES:
            for model in (keys.DEFAULT_MODEL, "i2v", "wan-14b"):
                assert keys.stage_of_queue(keys.queue_name(stage, priority, model)) is stage
    assert keys.stage_of_queue("reelfarm-encoder") is None
    assert keys.stage_of_queue("someone-elses-queue") is None


def test_demand_counts_queues_parked_retries_inflight_and_held_outputs(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    # Work over several models and priorities: pushed onto the demand lists as it is enqueued, before any recount,
    # so a stage scaled to zero (no worker, no maintenance pass) still sees it.
    queues.enqueue_stage(conn, "j1", Stage.ENCODE, 1, None, "default", secret=SECRET)
    queues.enqueue_stage(conn, "j2", Stage.ENCODE, 1, None, "high", secret=SECRET)
    queues.enqueue_stage(conn, "j3", Stage.ENCODE, 1, None, "low", model="i2v", secret=SECRET)
    queues.enqueue_stage(conn, "j4", Stage.TRANSFORM, 1, 1, "default", model="i2v", secret=SECRET)
    assert demand.read_demand(conn) == {Stage.ENCODE: 3, Stage.TRANSFORM: 1, Stage.DECODE: 0}
    assert conn.type(keys.demand_key(Stage.ENCODE)) == b"list"  # what KEDA's LLEN needs

    # One encode job dequeued but not started (rq's intermediate list): still demand.
    queue = queues.stage_queue(conn, Stage.ENCODE)
    conn.lmove(queue.key, queue.intermediate_queue_key)
    # A transform retry parked in its backoff, a decode in flight, an encode worker holding two outputs.
    conn.hset(keys.delayed_calls_key(), "j5", json.dumps({"stage": "transform", "job_id": "j5"}))
    conn.zadd(keys.inflight_key(), {keys.inflight_member("j6", Stage.DECODE, 1): 1.0})
    worker_registry.register_worker(conn, "encode-a", {"stage": "encode", "endpoint": "h:1", "held_outputs": "2"}, 30)
    # A stale, too-high count is corrected by the recount.
    demand.add_demand(conn, Stage.DECODE, 7)

    counted = demand.refresh_demand(conn, queues.stage_backlog(conn))
    assert counted == {Stage.ENCODE: 5, Stage.TRANSFORM: 2, Stage.DECODE: 1}
    assert demand.read_demand(conn) == counted

    # Work done: the maintenance pass brings every stage back to zero (the keys go away: LLEN 0).
    for stage in Stage:
        for q in queues.stage_queues_by_priority(conn, stage, [keys.DEFAULT_MODEL, "i2v"]):
            conn.delete(q.key, q.intermediate_queue_key)
    conn.delete(keys.delayed_calls_key(), keys.inflight_key())
    worker_registry.deregister_worker(conn, "encode-a")
    assert reaper.reap_once(conn, secret=SECRET) == []
    assert demand.read_demand(conn) == dict.fromkeys(Stage, 0)


def test_demand_is_capped(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    demand.add_demand(conn, Stage.TRANSFORM, demand.DEMAND_CAP + 5)
    assert demand.read_demand(conn)[Stage.TRANSFORM] == demand.DEMAND_CAP
    backlog = {Stage.ENCODE: demand.DEMAND_CAP * 2, Stage.TRANSFORM: 3, Stage.DECODE: 0}
    demand.refresh_demand(conn, backlog)
    assert demand.read_demand(conn) == {Stage.ENCODE: demand.DEMAND_CAP, Stage.TRANSFORM: 3, Stage.DECODE: 0}


def test_a_part_hop_counts_in_its_own_key_and_its_stage_kinds(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    high = keys.Hop("transform@high")
    queues.enqueue_stage(conn, "j1", high, 1, 1, secret=SECRET)
    # Plain transform workers serve every transform hop (their key counts it); a pool of one hop reads its own.
    assert demand.read_demand(conn) == {Stage.ENCODE: 0, Stage.TRANSFORM: 1, high: 1, Stage.DECODE: 0}
    assert demand.refresh_demand(conn, queues.stage_backlog(conn))[high] == 1
    conn.delete(queues.stage_queue(conn, high).key)
    assert high not in demand.refresh_demand(conn, queues.stage_backlog(conn)), "its key falls back to zero"
    assert conn.llen(keys.demand_key(high)) == 0
