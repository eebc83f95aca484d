"""ls / cancel / retry / info and the progress view, against a real Valkey (no workers: records are driven by hand)."""

from __future__ import annotations

import io
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from scheduler.cli import main
from scheduler.core import job_retry, jobs, keys, queues, recovery, worker_registry
from scheduler.core.job_record import Routing
from scheduler.core.keys import Stage
from scheduler.core.rooms import Rooms, RoomState
from scheduler.core.settings import FarmSettings
from scheduler.core.stage_calls import StageCall
from scheduler.intake.submit import submit
from scheduler.local.embedded import write_settings_file
from scheduler.ops import job_admin
from scheduler.ops.job_admin import JobAdminError
from scheduler.ops.progress_view import JobPoller, WaitTimedOut, wait_for_job, watch_jobs

TINY: dict[str, Any] = {"prompt": "a kite over a beach", "width": 64, "height": 48, "frames": 17, "steps": 2}


@pytest.fixture
def settings(redis_url: str) -> FarmSettings:
    return FarmSettings(redis_url=redis_url, secret=secrets.token_hex(8))


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def cli(settings: FarmSettings, tmp_path: Path, *args: str) -> Any:
    config = write_settings_file(settings, tmp_path / "farm.json")
    return CliRunner().invoke(main, [*args[:1], "--config", str(config), *args[1:]], catch_exceptions=False)


def test_cancel_queued_job_leaves_the_queue_and_is_cancelled(
    conn: redis.Redis, settings: FarmSettings, tmp_path: Path
) -> None:
    job_id = submit(conn, settings, TINY)
    other = submit(conn, settings, {**TINY, "seed": 2})
    queue = queues.stage_queue(conn, Stage.ENCODE)
    assert queue.count == 2

    result = cli(settings, tmp_path, "cancel", job_id)
    assert result.exit_code == 0, result.output
    assert f"cancelled {job_id}" in result.output
    assert queue.job_ids == [keys.stage_job_id(other, Stage.ENCODE, 1)]
    status = jobs.read_status(conn, job_id)
    assert status["state"] == "cancelled"
    assert status["stages"]["encode"]["state"] == "cancelled"
    assert status["error"] == "encode: cancelled by user"
    rq_job = queue.fetch_job(keys.stage_job_id(job_id, Stage.ENCODE, 1))
    assert rq_job is not None and rq_job.is_canceled

    again = cli(settings, tmp_path, "cancel", job_id)
    assert again.exit_code == 1 and "already finished" in again.output


def test_cancel_queued_transform_frees_the_producers_slot(conn: redis.Redis, settings: FarmSettings) -> None:
    job_id = submit(conn, settings, TINY)
    # As a finished encode leaves it: a published room and the transform queued.
    room = keys.room_key(job_id, Stage.ENCODE, 1)
    conn.hset(room, mapping={"state": int(RoomState.PUBLISHED), "producer_id": "encode-w1", "descriptor": "{}"})
    pipe = queues.transaction(conn)
    queues.stage_queue(conn, Stage.ENCODE).remove(keys.stage_job_id(job_id, Stage.ENCODE, 1), pipeline=pipe)
    jobs.mark_stage_queued(pipe, job_id, Stage.TRANSFORM, 1)
    conn.hset(keys.job_key(job_id), mapping={"encode.state": "done", "state": "running"})
    queues.enqueue_stage(conn, job_id, Stage.TRANSFORM, 1, 1, pipeline=pipe, secret=settings.require_secret())
    pipe.execute()

    assert job_admin.cancel_job(conn, job_id) == "cancelled"
    assert queues.stage_queue(conn, Stage.TRANSFORM).count == 0
    assert Rooms(conn).state(room) is RoomState.FAILED
    assert conn.lrange(keys.acks_key("encode-w1"), 0, -1) == [room.encode()]


def test_cancel_running_job_sets_the_flag(conn: redis.Redis, settings: FarmSettings) -> None:
    job_id = submit(conn, settings, TINY)
    queues.stage_queue(conn, Stage.ENCODE).pop_job_id()  # a worker dequeued it
    jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "encode-w1", 1)
    assert not job_admin.is_cancel_requested(conn, job_id)
    assert job_admin.cancel_job(conn, job_id) == "requested"
    assert job_admin.is_cancel_requested(conn, job_id)
    assert jobs.read_status(conn, job_id)["state"] == "running"  # the worker records the stop
    rows = job_admin.list_jobs(conn)
    assert rows[0].cancel_requested


def test_request_cancel_refuses_finished_and_unknown_jobs(conn: redis.Redis, settings: FarmSettings) -> None:
    job_id = submit(conn, settings, TINY)
    conn.hset(keys.job_key(job_id), "state", "succeeded")
    assert job_admin.request_cancel(conn, job_id) is False
    assert not job_admin.is_cancel_requested(conn, job_id)
    with pytest.raises(jobs.JobNotFound):
        job_admin.request_cancel(conn, "nosuchjob")


def test_cancel_job_waiting_out_a_retry_backoff(conn: redis.Redis, settings: FarmSettings) -> None:
    job_id = submit(conn, settings, TINY)
    queues.stage_queue(conn, Stage.ENCODE).pop_job_id()
    pipe = conn.pipeline(transaction=True)
    recovery.enqueue_later(
        conn,
        pipe,
        StageCall(job_id, Stage.ENCODE, 2, None),
        Routing("default", "default"),
        delay_seconds=60,
        secret=settings.require_secret(),
    )
    pipe.execute()
    assert conn.zcard(keys.delayed_key()) == 1
    assert job_admin.cancel_job(conn, job_id) == "cancelled"
    assert conn.zcard(keys.delayed_key()) == 0
    assert recovery.release_due(conn, now=time.time() + 120, secret=settings.require_secret()) == 0


def test_retry_failed_job_uses_a_higher_attempt(conn: redis.Redis, settings: FarmSettings, tmp_path: Path) -> None:
    job_id = submit(conn, settings, TINY)
    queues.stage_queue(conn, Stage.ENCODE).pop_job_id()
    # It got as far as transform attempt 2 before failing for good.
    jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "encode-w1", 1)
    pipe = conn.pipeline()
    jobs.mark_stage_finished(pipe, job_id, Stage.ENCODE, 1, 0.5)
    jobs.mark_stage_queued(pipe, job_id, Stage.TRANSFORM, 2)
    pipe.execute()
    assert jobs.mark_stage_started(conn, job_id, Stage.TRANSFORM, "transform-w1", 2)
    jobs.set_progress(conn, job_id, Stage.TRANSFORM, 1, 2)
    jobs.mark_failed(conn, job_id, Stage.TRANSFORM, "quarantined after 2 attempts")

    result = cli(settings, tmp_path, "retry", job_id)
    assert result.exit_code == 0, result.output
    assert "attempt 3" in result.output
    status = jobs.read_status(conn, job_id)
    assert status["state"] == "queued" and status["stage"] == "encode" and status["error"] is None
    assert status["stages"]["encode"] == {"state": "queued", "attempt": "3"}
    # Old timings are gone; the attempt counter stays so the next transform is attempt 3 too.
    assert status["stages"]["transform"] == {"attempt": "2"}
    assert job_retry.next_stage_attempt(conn, job_id, Stage.TRANSFORM) == 3
    fields = jobs.job_fields(conn, job_id)
    assert fields["retries"] == "1" and fields["attempt_base"] == "2"
    assert queues.stage_queue(conn, Stage.ENCODE).job_ids == [keys.stage_job_id(job_id, Stage.ENCODE, 3)]

    # A queued job is not retried twice.
    with pytest.raises(JobAdminError, match="only failed or cancelled"):
        job_retry.resubmit(conn, job_id, secret=settings.require_secret())
    again = cli(settings, tmp_path, "retry", job_id)
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "only failed or cancelled" in again.output


def test_retry_all_failed(conn: redis.Redis, settings: FarmSettings, tmp_path: Path) -> None:
    ids = [submit(conn, settings, {**TINY, "seed": i}) for i in range(4)]
    for job_id in ids[:3]:
        jobs.mark_failed(conn, job_id, Stage.ENCODE, "boom")
    result = cli(settings, tmp_path, "retry", "--failed")
    assert result.exit_code == 0 and "re-queued 3 failed jobs" in result.output
    assert {jobs.read_status(conn, j)["state"] for j in ids} == {"queued"}


def test_ls_filters_and_one_line_errors(conn: redis.Redis, settings: FarmSettings, tmp_path: Path) -> None:
    old = submit(conn, settings, {**TINY, "seed": 1})
    conn.zadd(keys.jobs_index_key(), {old: time.time() - 7200})
    conn.hset(keys.job_key(old), "created_at", repr(time.time() - 7200))
    new = submit(conn, settings, {**TINY, "seed": 2})
    jobs.mark_failed(conn, new, Stage.ENCODE, "boom")

    assert [r.job_id for r in job_admin.list_jobs(conn)] == [new, old]
    assert [r.job_id for r in job_admin.list_jobs(conn, since=job_admin.parse_since("1h"))] == [new]
    assert [r.job_id for r in job_admin.list_jobs(conn, states=["queued"])] == [old]
    listing = cli(settings, tmp_path, "ls", "--state", "failed")
    assert new in listing.output and old not in listing.output and "encode: boom" in listing.output

    for args, message in [
        (["cancel", "nosuchjob"], "job nosuchjob not found"),
        (["ls", "--since", "yesterday-ish"], "--since"),
        (["ls", "--batch", "nope"], "batch 'nope' not found"),
        (["cancel"], "give a JOB id or --batch NAME"),
    ]:
        result = cli(settings, tmp_path, *args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("reelfarm: ") and result.output.count("\n") == 1, result.output
        assert message in result.output


def test_info_shows_queues_and_workers(conn: redis.Redis, settings: FarmSettings, tmp_path: Path) -> None:
    submit(conn, settings, {**TINY, "priority": "high"})
    submit(conn, settings, TINY)
    worker_registry.register_worker(
        conn,
        "transform-host-1-abc",
        {
            "stage": "transform",
            "model_dir": "/models/wan-t2v",
            "device": "cuda:0",
            "state": "busy",
            "current_job": "j1",
        },
        ttl_seconds=30,
    )
    assert job_admin.queue_rows(conn)[0].depths == {"high": 1, "default": 1, "low": 0}
    result = cli(settings, tmp_path, "info", "--json")
    info = json.loads(result.output)
    assert info["queues"]["encode"]["default"]["high"] == 1
    # Both submissions raised the encode stage's autoscaling demand as they were enqueued.
    assert info["demand"] == {"encode": 2, "transform": 0, "decode": 0}
    (worker,) = info["workers"]
    assert (worker["stage"], worker["model"], worker["device"], worker["state"], worker["current_job"]) == (
        "transform",
        "wan-t2v",
        "cuda:0",
        "busy",
        "j1",
    )
    text = cli(settings, tmp_path, "info").output
    assert "transform-host-1-abc" in text and "cuda:0" in text and "ago" in text
    assert "encode 2, transform 0, decode 0" in text


# --------------------------------------------------------------------------- progress view


def test_progress_plain_lines_and_rich_bars(conn: redis.Redis, settings: FarmSettings) -> None:
    ids = [submit(conn, settings, {**TINY, "seed": i}) for i in range(3)]
    conn.hset(keys.job_key(ids[0]), mapping={"state": "succeeded"})
    conn.hset(
        keys.job_key(ids[1]),
        mapping={"state": "running", "encode.state": "done", "transform.state": "running", "transform.progress": "1/2"},
    )
    snap = JobPoller(conn, ids).poll()
    assert snap.finished == 1 and snap.stage_done["encode"] == 2 and snap.stage_done["transform"] == 1.5

    out = io.StringIO()
    with pytest.raises(WaitTimedOut, match="1/3 finished"):
        watch_jobs(conn, ids, title="batch t", timeout=0.3, poll_seconds=0.1, stream=out, live=False)
    assert "batch t: 1/3 finished (1 succeeded, 1 running, 1 queued)" in out.getvalue()
    assert "transform 1/3" in out.getvalue()

    for job_id in ids[1:]:
        conn.hset(keys.job_key(job_id), "state", "failed")
    tty = io.StringIO()
    final = watch_jobs(conn, ids, title="batch t", stream=tty, live=True, poll_seconds=0.05)
    assert final.all_finished and final.states == {"succeeded": 1, "failed": 2}
    assert "batch t" in tty.getvalue() and "encode" in tty.getvalue()


def test_wait_for_job_prints_a_line_per_change(conn: redis.Redis, settings: FarmSettings) -> None:
    job_id = submit(conn, settings, TINY)
    conn.hset(keys.job_key(job_id), mapping={"state": "succeeded", "encode.state": "done"})
    out = io.StringIO()
    record = wait_for_job(conn, job_id, timeout=5, stream=out, live=False)
    assert record["state"] == "succeeded"
    assert out.getvalue() == "[succeeded] encode done\n"


def test_info_lists_workers_with_free_slots_and_receive_path(
    conn: redis.Redis, settings: FarmSettings, tmp_path: Path
) -> None:
    record = {"stage": "transform", "state": "idle", "slots": "2", "free_slots": "1", "receive": "private"}
    worker_registry.register_worker(conn, "transform-w1", {**record, "device": "cpu"}, ttl_seconds=30)
    group = {"decode_ranks": "4", "decode_grid": "2x2", "decode_group": "up"}
    worker_registry.register_worker(
        conn, "decode-w1", {**record, **group, "stage": "decode", "receive": "slot"}, ttl_seconds=30
    )
    rows = {row.worker_id: row for row in job_admin.worker_rows(conn)}
    assert rows["transform-w1"].free_slots == "1/2" and rows["transform-w1"].receive == "private"
    assert rows["decode-w1"].receive == "slot"
    assert rows["decode-w1"].decode_group == "4:2x2:up" and rows["transform-w1"].decode_group == "-"
    result = cli(settings, tmp_path, "info")
    assert result.exit_code == 0, result.output
    header, *lines = [
        line for line in result.output.splitlines() if line.startswith(("WORKER", "transform-w1", "decode-w1"))
    ]
    assert header.split()[-1] == "RECEIVE"
    assert {line.split()[0]: line.split()[-1] for line in lines} == {"transform-w1": "private", "decode-w1": "slot"}
    assert {line.split()[0]: line.split()[-2] for line in lines} == {"transform-w1": "-", "decode-w1": "4:2x2:up"}
