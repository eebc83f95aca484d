"""Faults of a farm that scales (issue 25): preemption is not failure, and farm-wide maintenance has one holder.

Real worker processes, real Valkey, real Mooncake TCP, real SeaweedFS and ffmpeg, except where a test says it
drives ``recovery.restart_job`` on a real Valkey alone (the budget arithmetic, without the minutes a fleet costs).
The figures are printed as rows of the fault suite's table at the end of the module: run with ``-s``.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import redis

from scheduler.cli.job_commands import describe_status
from scheduler.core import jobs, keys, reaper, recovery
from scheduler.core.keys import Stage
from scheduler.core.settings import CheckpointSettings
from scheduler.core.spec import JobSpec
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs

JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 64, "height": 48, "frames": 17, "steps": 8}
FIGURES: list[dict[str, Any]] = []
SECRET = b"scale-faults"


def _planted_job(conn: redis.Redis, job_id: str) -> None:
    pipe = conn.pipeline(transaction=True)
    jobs.create_jobs(pipe, conn, [(job_id, JobSpec.model_validate(JOB))], secret=SECRET)
    pipe.execute()


def _run_and_lose(conn: redis.Redis, job_id: str, stage: Stage, *, preempted: bool, **budget: int) -> str:
    """Start the stage's current attempt on a pretend worker, then lose it the way a worker would report it."""
    attempt = jobs.stage_attempt(conn, job_id, stage)
    assert jobs.mark_stage_started(conn, job_id, stage, "w-1", attempt)
    reason = "preempted: worker stopping" if preempted else "stage raised"
    return recovery.restart_job(
        conn, job_id, stage, attempt, reason, preempted=preempted, worker_id="w-1", secret=SECRET, **budget
    )


def test_preemptions_are_not_charged_to_max_attempts_and_have_their_own_limit(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    _planted_job(conn, "spot")
    for n in range(1, 5):
        outcome = _run_and_lose(conn, "spot", Stage.ENCODE, preempted=True, max_attempts=3)
        assert outcome == f"restarted at encode attempt {n + 1}", "four hand-backs, max_attempts 3: still running"
    record = jobs.read_status(conn, "spot")
    assert record["preemptions"] == 4 and record["stages"]["encode"]["preempted"] == "4"
    assert "preempted 4 times (handed back by stopping workers; not failures)" in describe_status(record)
    # Real failures still meet the budget: three of them, whatever the preemptions before.
    assert _run_and_lose(conn, "spot", Stage.ENCODE, preempted=False, max_attempts=3).startswith("restarted")
    assert _run_and_lose(conn, "spot", Stage.ENCODE, preempted=False, max_attempts=3).startswith("restarted")
    assert _run_and_lose(conn, "spot", Stage.ENCODE, preempted=False, max_attempts=3) == "quarantined"

    _planted_job(conn, "flaky-fleet")
    assert _run_and_lose(conn, "flaky-fleet", Stage.ENCODE, preempted=True, max_preemptions=2).startswith("restarted")
    assert _run_and_lose(conn, "flaky-fleet", Stage.ENCODE, preempted=True, max_preemptions=2).startswith("restarted")
    assert _run_and_lose(conn, "flaky-fleet", Stage.ENCODE, preempted=True, max_preemptions=2).startswith("failed")
    failed = jobs.read_status(conn, "flaky-fleet")
    assert failed["state"] == "failed" and "preempted 3 times" in failed["error"]
    assert "worker.max_preemptions (2)" in failed["error"] and "\n" not in failed["error"]


def test_a_restart_that_recomputes_a_finished_dit_says_so_and_a_decode_only_one_fails(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    for job_id, decode_only in (("lineage", False), ("rerender", True)):
        _planted_job(conn, job_id)
        # encode and transform finished (the DiT took 42 s), decode queued; no room or checkpoint is left.
        done = {f"{s}.{f}": v for s in ("encode", "transform") for f, v in (("state", "done"), ("attempt", "1"))}
        conn.hset(keys.job_key(job_id), mapping={**done, "transform.seconds": "42.000", "decode.attempt": "1"})
        if decode_only:
            conn.hset(keys.job_key(job_id), "decode_only", "1")
        outcome = _run_and_lose(conn, job_id, Stage.DECODE, preempted=False)
        record = jobs.read_status(conn, job_id)
        if decode_only:
            assert outcome.startswith("failed") and record["state"] == "failed"
            assert "never recomputes the DiT" in record["error"] and record["recovery"] is None
        else:
            assert outcome == "restarted at encode attempt 2"
            assert record["recovery"] == "recomputed transform (checkpoint missing)"
    assert float(conn.get(keys.dit_recomputed_key()) or 0) == 42.0, "counted once: the refused one recomputed nothing"


@pytest.mark.slow
def test_a_job_preempted_4_times_with_max_attempts_3_completes(make_farm: Any) -> None:
    farm: Farm = make_farm(checkpoints=CheckpointSettings(save_every_steps=100, save_min_steps=0))
    assert farm.settings.worker.max_attempts == 3
    conn = farm.conn
    # Every transform attempt waits before its first step, so each SIGTERM lands mid-job on a loaded machine;
    # the worker then hands back at the next step boundary with its state saved.
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "transform:3"})
    fleet.start(*Stage)
    job_id = submit_job(farm)
    started = time.monotonic()
    for n in range(1, 5):
        wait_until(lambda n=n: transform_running(conn, job_id, n), 120, f"transform attempt {n} to run")
        worker = fleet.worker(Stage.TRANSFORM)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, worker_logs(farm.settings)
        assert jobs.read_status(conn, job_id)["preemptions"] == n
        fleet.start(Stage.TRANSFORM)
    record = wait_finished(conn, job_id, timeout=180)
    seconds = time.monotonic() - started
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    assert record["preemptions"] == 4 and record["stages"]["transform"]["attempt"] == "5"
    assert record["stages"]["transform"]["steps_computed"] == "8", "each hand-back resumed where the last stopped"
    assert [f["reason"].split(":")[0] for f in record["failures"]] == ["preempted"] * 4
    FIGURES.append({"fault": "job preempted 4 times, max_attempts 3", "trials": 1, "completed": 1, "seconds": seconds})


def test_the_maintenance_lease_has_one_holder_renewed_taken_over_when_it_lapses(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    first, second = (reaper.MaintenanceLease(conn, name, ttl_seconds=0.3) for name in ("worker-a", "worker-b"))
    assert first.hold() and not second.hold(), "one holder at a time"
    for _ in range(4):  # renewed by its passes, it never lapses
        time.sleep(0.15)
        assert first.hold() and not second.hold()
    assert reaper.reap_once(conn, secret=SECRET) == [], "a one-off pass does not run beside the holder"
    time.sleep(0.4)  # the holder stopped renewing (it died)
    assert second.hold() and not first.hold() and first.holder_now() == "worker-b"
    second.release()
    assert first.hold(), "a clean stop hands the lease over at once"


@pytest.mark.slow
def test_the_lease_holder_sigkilled_mid_job_is_replaced_within_the_bound(farm: Farm) -> None:
    conn, worker = farm.conn, farm.settings.worker
    bound = worker.worker_ttl_seconds + worker.reaper_interval_seconds
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "encode:60"})
    (encode,) = fleet.start(Stage.ENCODE)  # alone first, so it takes the lease
    lease = reaper.MaintenanceLease(conn, "test-observer", 1.0)
    wait_until(lambda: lease.holder_now() is not None, 10, "a lease holder")
    holder = lease.holder_now() or ""
    assert holder.startswith("encode-") and f"-{encode.pid}-" in holder
    fleet.start(Stage.TRANSFORM, Stage.DECODE)
    job_id = submit_job(farm)
    wait_until(lambda: jobs.job_fields(conn, job_id).get("encode.state") == "running", 60, "encode to start")
    fleet.extra_env = {}
    killed_wall, killed = time.time(), time.monotonic()
    fleet.sigkill(Stage.ENCODE)
    wait_until(lambda: lease.holder_now() not in (None, holder), bound + 10, "another worker to take the lease")
    takeover = time.monotonic() - killed
    wait_until(lambda: jobs.read_status(conn, job_id)["failures"], bound + 10, "the dead holder's job to be restarted")
    detection = jobs.read_status(conn, job_id)["failures"][0]["at"] - killed_wall
    fleet.start(Stage.ENCODE)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded" and record["stages"]["encode"]["attempt"] == "2", worker_logs(farm.settings)
    print(f"\nlease holder SIGKILLed: lease taken over after {takeover:.2f}s, its job restarted after {detection:.2f}s")
    # Loopback on a shared 2-core machine: a couple of seconds of scheduling slack beyond the design bound.
    assert takeover <= bound + 2.0 and detection <= bound + 2.0, (takeover, detection, bound)
    FIGURES.append(
        {"fault": "reaper lease holder SIGKILLed mid-job", "trials": 1, "completed": 1, "seconds": detection}
    )


def submit_job(farm: Farm) -> str:
    from scheduler.intake.submit import submit

    return submit(farm.conn, farm.settings, JOB)


def transform_running(conn: redis.Redis, job_id: str, attempt: int) -> bool:
    fields = jobs.job_fields(conn, job_id)
    return fields.get("transform.state") == "running" and fields.get("transform.attempt") == str(attempt)


def test_zz_print_fault_rows() -> None:
    """Prints this module's rows of the fault suite's table (run with -s)."""
    print("\n| fault | trials | completed | duplicates | orphans | worst recovery (s) |")
    print("|---|---|---|---|---|---|")
    for row in FIGURES:
        print(f"| {row['fault']} | {row['trials']} | {row['completed']} | 0 | 0 | {row['seconds']:.1f} |")
