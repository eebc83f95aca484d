"""The places reelfarm leans on rq's internals, checked against the installed rq, so an upgrade that moves
them fails here rather than silently reopening the queue side door.

``pyproject.toml`` pins rq to the minor release these pass on.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import redis
from rq import Callback, Queue
from rq.exceptions import StopRequested
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from scheduler.core import keys, queues
from scheduler.core.keys import Stage
from workers.stage_worker import StageWorker


def test_the_worker_hooks_stage_worker_overrides_keep_their_shape() -> None:
    for name in ("dequeue_job_and_maintain_ttl", "execute_job", "request_stop"):
        ours = inspect.signature(getattr(StageWorker, name))
        theirs = inspect.signature(getattr(SimpleWorker, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert name in vars(StageWorker), f"StageWorker no longer overrides {name}"


def test_rq_bookkeeping_farm_worker_trims_keeps_its_shape() -> None:
    # queues.FarmWorker overrides these; rq must still route every heartbeat and state write through them.
    for name in ("heartbeat", "set_state", "handle_execution_ended", "check_for_suspension"):
        ours = inspect.signature(getattr(queues.FarmWorker, name))
        theirs = inspect.signature(getattr(SimpleWorker, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    assert issubclass(StageWorker, queues.FarmWorker)


def test_rq_heartbeats_are_sent_once_per_slack_and_keep_the_worker_key_alive(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    worker = queues.FarmWorker(
        [Queue(keys.queue_name(Stage.ENCODE), connection=conn)], connection=conn, name="hb-test"
    )
    worker.register_birth()
    sent: list[str] = []
    conn.set_response_callback("EXPIRE", lambda reply, **_: sent.append("expire") or reply)  # type: ignore[func-returns-value]
    worker.heartbeat()
    ttl = conn.ttl(worker.key)
    for _ in range(4):  # what rq sends around one short job
        worker.heartbeat()
        worker.heartbeat(420)
    assert sent.count("expire") == 2, "one heartbeat (worker key + executions set) for the whole burst"
    assert ttl > worker.worker_ttl, ttl
    # Past the slack, the next one goes out again.
    worker._rq_key_expires_at = worker._rq_key_expires_at - worker.rq_heartbeat_slack_seconds - 1
    worker.heartbeat()
    assert sent.count("expire") == 4
    # An unchanged state is not rewritten; a change is.
    worker.set_state("idle")
    conn.hset(worker.key, "state", "planted")
    worker.set_state("idle")
    assert conn.hget(worker.key, "state") == b"planted"
    worker.set_state("busy")
    assert conn.hget(worker.key, "state") == b"busy"


def test_a_suspended_farm_still_stops_a_farm_worker(redis_url: str) -> None:
    from rq.suspension import resume, suspend

    conn = redis.Redis.from_url(redis_url)
    worker = queues.FarmWorker([Queue(keys.queue_name(Stage.ENCODE), connection=conn)], connection=conn, name="susp")
    worker.register_birth()
    worker.check_for_suspension(burst=True)  # not suspended: returns at once
    suspend(conn)
    with pytest.raises(StopRequested):  # rq's own answer to `rq suspend` in burst mode
        worker.check_for_suspension(burst=True)
    resume(conn)


def test_call_fields_sees_callbacks_webhooks_and_arguments_without_importing(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    queue = Queue(keys.queue_name(Stage.ENCODE), connection=conn, serializer=JSONSerializer)
    planted = queue.enqueue(
        "no.such.module.function",
        1,
        two=2,
        on_success=Callback("os.system"),
        on_failure=Callback("os.remove"),
        on_stopped=Callback("os.kill"),
    )
    fetched = Job.fetch(planted.id, connection=conn, serializer=JSONSerializer)
    fields = queues.call_fields(fetched)
    assert fields.func_name == "no.such.module.function" and list(fields.args) == [1] and fields.kwargs == {"two": 2}
    assert sorted(fields.callbacks) == ["os.kill", "os.remove", "os.system"]


def test_a_job_hash_rq_cannot_read_names_its_id_and_queue(redis_url: str) -> None:
    # StageWorker refuses such a job by the id and queue rq attaches to the error (rather than ending its loop).
    conn = redis.Redis.from_url(redis_url)
    queue = Queue(keys.queue_name(Stage.ENCODE), connection=conn, serializer=JSONSerializer)
    job = queue.enqueue("os.getcwd")
    conn.hset(Job.key_for(job.id), "success_callback_timeout", "not a number")
    try:
        Queue.dequeue_any([queue], None, connection=conn, serializer=JSONSerializer)
    except Exception as exc:  # noqa: BLE001 - whatever rq raises, it must carry these
        assert getattr(exc, "job_id", None) == job.id
        assert getattr(exc, "queue", None) is not None and exc.queue.name == queue.name  # type: ignore[attr-defined]
    else:
        raise AssertionError("rq read a job hash with a malformed field; pick another malformation for this test")


def test_registry_maintenance_never_runs_a_planted_failure_callback(redis_url: str, tmp_path: Path) -> None:
    # rq's own clean-up would import and call this job's failure callback: it expired in the started registry.
    conn = redis.Redis.from_url(redis_url)
    queue = Queue(keys.queue_name(Stage.TRANSFORM), connection=conn, serializer=JSONSerializer)
    marker = tmp_path / "callback-ran"
    job = queue.enqueue(
        "os.getcwd", on_failure=Callback("tests.planted_calls.touch_from_meta"), meta={"marker": str(marker)}
    )
    conn.lrem(queue.key, 0, job.id)
    conn.hset(Job.key_for(job.id), "status", "started")
    started = StartedJobRegistry(queue.name, connection=conn, serializer=JSONSerializer)
    conn.zadd(started.key, {job.id: 1})
    assert started.get_expired_job_ids() == [job.id]
    assert "clean_registries" in vars(StageWorker)
    queues.clean_registries_without_hooks(queue)
    assert not marker.exists()
    assert conn.zcard(started.key) == 0


def test_malformed_job_data_is_unreadable_not_a_crash(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    queue = Queue(keys.queue_name(Stage.ENCODE), connection=conn, serializer=JSONSerializer)
    job = queue.enqueue("os.getcwd")
    conn.hset(Job.key_for(job.id), "dependency_ids", "5")
    with pytest.raises(ValueError, match="dependency ids"):
        queues.call_fields(Job.fetch(job.id, connection=conn, serializer=JSONSerializer))
