"""Submission against a real Valkey: atomic, idempotent per job id, routed by priority."""

from __future__ import annotations

import threading
from pathlib import Path

import redis

from scheduler.core import keys
from scheduler.core.keys import Stage
from scheduler.core.queues import queue_depths, stage_queue
from scheduler.core.settings import FarmSettings
from scheduler.intake.submit import submit


def settings(tmp_path: Path, redis_url: str) -> FarmSettings:
    return FarmSettings(redis_url=redis_url, secret="s", home=tmp_path, model_dir=tmp_path / "no-model")


def test_racing_submitters_of_one_id_enqueue_it_once(redis_url: str, tmp_path: Path) -> None:
    cfg = settings(tmp_path, redis_url)
    pool = redis.ConnectionPool.from_url(redis_url)
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        submit(redis.Redis(connection_pool=pool), cfg, {"prompt": "a fox", "frames": 17}, job_id="same-id")

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn = redis.Redis(connection_pool=pool)
    assert queue_depths(conn)["encode"] == 1
    assert conn.zcard(keys.jobs_index_key()) == 1


def test_priority_picks_the_queue(redis_url: str, tmp_path: Path) -> None:
    cfg = settings(tmp_path, redis_url)
    conn = redis.Redis.from_url(redis_url)
    submit(conn, cfg, {"prompt": "urgent", "priority": "high"}, job_id="hi")
    submit(conn, cfg, {"prompt": "whenever", "priority": "low"}, job_id="lo")
    assert stage_queue(conn, Stage.ENCODE, "high").job_ids == [keys.stage_job_id("hi", Stage.ENCODE, 1)]
    assert stage_queue(conn, Stage.ENCODE, "low").job_ids == [keys.stage_job_id("lo", Stage.ENCODE, 1)]
    assert stage_queue(conn, Stage.ENCODE).count == 0
