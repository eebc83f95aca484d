"""Rooms on a real farm (issue 3): refused descriptors, lineage recovery after a producer dies, backpressure.

Real Valkey, real Mooncake TCP between worker processes, real SeaweedFS and ffmpeg.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from scheduler.core import keys, queues, worker_registry
from scheduler.core.descriptors import Descriptor, TensorEntry
from scheduler.core.jobs import read_status
from scheduler.core.keys import Stage
from scheduler.core.rooms import Rooms, RoomState
from scheduler.core.settings import FarmSettings
from scheduler.intake.submit import submit
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs

pytestmark = pytest.mark.slow

TINY_JOB: dict[str, Any] = {"prompt": "a red fox", "width": 64, "height": 48, "frames": 17, "steps": 2}


def plant_room(conn: redis.Redis, settings: FarmSettings, job_id: str, producer_id: str, **changes: Any) -> str:
    """A job whose encode 'finished' with a descriptor the test controls, and its transform enqueued."""
    submit(conn, settings, TINY_JOB, job_id=job_id)
    # Take the real encode enqueue back out: this job's encode output is the planted room.
    queues.stage_queue(conn, Stage.ENCODE).remove(keys.stage_job_id(job_id, Stage.ENCODE, 1))
    now = time.time()
    fields: dict[str, Any] = dict(
        job_id=job_id,
        producer_stage="encode",
        attempt=1,
        producer_id=producer_id,
        endpoint="127.0.0.1:15999",
        slot_base=1 << 20,
        slot_bytes=1 << 20,
        tensors=(TensorEntry(name="prompt_embeds", dtype="float32", shape=(1, 512, 32), offset=0, nbytes=65536),),
        checksum="xxh3_128:00",
        created_at=now,
        lease_expires_at=now + 60,
    )
    signature = changes.pop("signature", None)
    fields.update(changes)
    desc = Descriptor.model_validate(fields)
    pipe = queues.transaction(conn)
    Rooms(conn).publish(desc, signature or desc.sign(settings.require_secret()), pipeline=pipe)
    pipe.hset(keys.job_key(job_id), mapping={"encode.state": "done", "transform.attempt": "1"})
    queues.enqueue_stage(conn, job_id, Stage.TRANSFORM, 1, 1, pipeline=pipe, secret=settings.require_secret())
    pipe.execute()
    return keys.room_key(job_id, Stage.ENCODE, 1)


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("forged", {"signature": "0" * 64}, "signature does not match"),
    ("foreign", {"endpoint": "127.0.0.2:15999"}, "is not the endpoint producer"),
    (
        "offslot",
        {"tensors": (TensorEntry(name="x", dtype="uint8", shape=(4096,), offset=(1 << 20) - 100, nbytes=4096),)},
        "outside the producer's slot",
    ),
    (
        "oversized",
        {
            "slot_bytes": 1 << 26,
            "tensors": (TensorEntry(name="x", dtype="uint8", shape=(1 << 25,), offset=0, nbytes=1 << 25),),
        },
        "over the limit",
    ),
]


def test_refused_descriptors_fail_their_rooms_and_the_worker_keeps_serving(farm: Farm) -> None:
    settings = farm.settings
    conn = farm.conn
    # Own farm: a fake producer is registered and rooms are planted; no real encode worker may take them.
    fleet = farm.fleet()
    fleet.start(Stage.TRANSFORM)
    # A live producer record with a known endpoint, so only the planted defect can be refused.
    worker_registry.register_worker(
        conn, "encode-fake-1", {"stage": "encode", "endpoint": "127.0.0.1:15999"}, ttl_seconds=300
    )
    for case, changes, reason in REFUSALS:
        room = plant_room(conn, settings, f"bad-{case}", "encode-fake-1", **changes)
        record = wait_finished(conn, f"bad-{case}", timeout=60)
        assert record["state"] == "failed", case
        assert reason in record["error"], (case, record["error"])
        state = Rooms(conn).read(room)
        assert int(state["state"]) == RoomState.FAILED, case
        assert reason in state["reason"], case
    # The same transform worker process serves the next real job.
    fleet.start(Stage.ENCODE, Stage.DECODE)
    good = submit(conn, settings, TINY_JOB)
    assert wait_finished(conn, good)["state"] == "succeeded", worker_logs(settings)
    assert fleet.all_alive()


def test_producer_killed_before_pull_recomputes_upstream(farm: Farm) -> None:
    settings = farm.settings
    conn = farm.conn
    # Own farm: its encode worker is SIGKILLed.
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE)
    job_id = submit(conn, settings, TINY_JOB)
    room = keys.room_key(job_id, Stage.ENCODE, 1)
    wait_until(lambda: Rooms(conn).state(room) is RoomState.PUBLISHED, 60, "encode to publish")
    fleet.sigkill(Stage.ENCODE)
    # Another encode worker, and the consumers: the transform finds the producer gone.
    fleet.start(Stage.ENCODE, Stage.TRANSFORM, Stage.DECODE)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded", worker_logs(settings)
    assert record["stages"]["encode"]["attempt"] == "2"
    assert any("input lost" in f["reason"] for f in record["failures"]), record["failures"]
    assert Rooms(conn).state(room) is RoomState.FAILED
    assert Rooms(conn).state(keys.room_key(job_id, Stage.ENCODE, 2)) is RoomState.ACKED


def test_backpressure_two_slots_six_jobs(farm: Farm) -> None:
    settings = farm.settings
    conn = farm.conn
    # Own farm: only an encode worker runs at first, and its free slots are counted.
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE)
    job_ids = [submit(conn, settings, {**TINY_JOB, "seed": i}) for i in range(6)]

    def published() -> list[str]:
        return [j for j in job_ids if read_status(conn, j)["stages"]["encode"].get("state") == "done"]

    wait_until(lambda: len(published()) == 2, 60, "two encodes to finish")
    time.sleep(3.0)  # ample time for a third encode, were the worker to take one
    assert len(published()) == 2
    assert queues.queue_depths(conn)["encode"] == 4, "the other four stay queued, not taken"
    encode = next(w for w in worker_registry.live_workers(conn) if w["stage"] == "encode")
    assert encode["free_slots"] == "0"
    fleet.start(Stage.TRANSFORM, Stage.DECODE)
    records = [wait_finished(conn, j, timeout=180) for j in job_ids]
    assert [r["state"] for r in records] == ["succeeded"] * 6, worker_logs(settings)
    attempts = {r["stages"]["encode"]["attempt"] for r in records}
    assert attempts == {"1"}, "backpressure must not cost recomputes"
