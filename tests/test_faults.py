"""Fault injection on a real farm (issue 4): every accepted job ends with exactly one video, or FAILED with a reason.

Real worker processes, real Valkey, real Mooncake TCP, real SeaweedFS and ffmpeg.
The figures (trials, recovery times) are printed as a table at the end of the
module: run with ``-s`` to see them.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.core import jobs, keys, queues
from scheduler.core.keys import Stage
from scheduler.core.object_store import S3Config, ensure_bucket, get_bytes, list_incomplete_uploads, make_s3_client
from scheduler.core.spec import SpecError
from scheduler.core.worker_registry import live_workers
from scheduler.intake.submit import submit
from scheduler.local.processes import free_port
from scheduler.local.seaweedfs import start_s3_server
from scheduler.local.valkey import start_valkey
from tests.farm_fixtures import Farm
from tests.farm_harness import WorkerFleet, farm_settings, wait_finished, wait_until, worker_logs
from tests.video_probe import probe_frame_count

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 64, "height": 48, "frames": 17, "steps": 8}
DETECTION_BOUND_SECONDS = 60.0
FIGURES: list[dict[str, Any]] = []


def objects_under(client: Any, bucket: str, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def assert_exactly_one_video(client: Any, bucket: str, record: dict[str, Any], frames: int = 17) -> None:
    stem = record["result"]["video_key"].rsplit("/", 1)[0]
    assert objects_under(client, bucket, stem + "/") == [
        f"{stem}/metadata.json",
        f"{stem}/poster.jpg",
        f"{stem}/video.mp4",
    ]
    assert probe_frame_count(get_bytes(client, bucket, record["result"]["video_key"])) == frames
    assert list_incomplete_uploads(client, bucket, stem) == []


@pytest.mark.parametrize("stage", list(Stage))
def test_sigkill_at_a_random_point_of_each_stage(farm: Farm, s3_config: S3Config, stage: Stage) -> None:
    settings = farm.settings
    conn = farm.conn
    client = make_s3_client(s3_config)
    slow = 1.5
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": f"{stage.value}:{slow}"})
    rng = random.Random(f"kill-{stage.value}")
    worst = 0.0
    trials = 2
    fleet.start(*Stage)
    for trial in range(trials):
        job_id = submit(conn, settings, {**JOB, "seed": trial})
        field = f"{stage.value}.state"
        wait_until(lambda j=job_id, f=field: jobs.job_fields(conn, j).get(f) == "running", 60, f"{stage} to start")
        time.sleep(rng.uniform(0.0, slow))
        killed_at = time.monotonic()
        fleet.sigkill(stage)
        fleet.start(stage)
        record = wait_finished(conn, job_id, timeout=180)
        assert record["state"] == "succeeded", worker_logs(settings)
        assert_exactly_one_video(client, s3_config.bucket, record)
        # Recovery: from the kill until the farm restarted the job (the failure it recorded).
        kill_wall = time.time() - (time.monotonic() - killed_at)
        recoveries = [f["at"] - kill_wall for f in record["failures"]]
        assert recoveries, "the kill landed mid-job, so the farm must have recorded a restart"
        recovery = max(recoveries)
        worst = max(worst, recovery)
        assert recovery < DETECTION_BOUND_SECONDS
    FIGURES.append(
        {
            "fault": f"SIGKILL {stage.value} worker mid-job",
            "trials": trials,
            "completed": trials,
            "worst_recovery_s": round(worst, 1),
        }
    )


def test_sigkill_decode_mid_upload_leaves_one_video_and_no_orphan_parts(
    farm: Farm,
    s3_config: S3Config,
) -> None:
    """Killed between two parts of its multipart upload, the decode worker leaves an incomplete upload;
    the restarted attempt must abort it and land exactly one video."""
    settings = farm.settings
    conn = farm.conn
    client = make_s3_client(s3_config)
    # Lossless 512x256x33 from the tiny model is about 11.7 MB: two parts of the default 8 MiB.
    spec = {**JOB, "width": 512, "height": 256, "frames": 33, "steps": 2, "codec": {"name": "lossless"}}
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "decode-upload:60"})
    fleet.start(*Stage)
    job_id = submit(conn, settings, spec)

    def parts_in_flight() -> list[Any]:
        return [u for u in list_incomplete_uploads(client, s3_config.bucket, "") if job_id in u.key]

    wait_until(parts_in_flight, 180, "the first part of the video upload")
    killed_at = time.time()
    fleet.sigkill(Stage.DECODE)
    assert parts_in_flight(), "the kill landed mid-upload"
    fleet.extra_env = {}  # the replacement decodes without pausing
    fleet.start(Stage.DECODE)
    record = wait_finished(conn, job_id, timeout=240)
    assert record["state"] == "succeeded", worker_logs(settings)
    assert_exactly_one_video(client, s3_config.bucket, record, frames=33)
    assert parts_in_flight() == []
    assert record["failures"] and record["failures"][0]["stage"] == "decode"
    recovery = record["failures"][0]["at"] - killed_at
    assert recovery < DETECTION_BOUND_SECONDS
    FIGURES.append(
        {"fault": "SIGKILL decode mid-upload", "trials": 1, "completed": 1, "worst_recovery_s": round(recovery, 1)}
    )


def test_sigterm_mid_job_finishes_it(
    farm: Farm,
    s3_config: S3Config,
) -> None:
    settings = farm.settings
    conn = farm.conn
    fleet = farm.fleet()
    fleet.start(*Stage)
    job_id = submit(conn, settings, {**JOB, "steps": 12})
    wait_until(lambda: jobs.job_fields(conn, job_id).get("transform.state") == "running", 60, "transform")
    transform = fleet.worker(Stage.TRANSFORM)
    transform.send_signal(signal.SIGTERM)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded", worker_logs(settings)
    assert record["stages"]["transform"]["attempt"] == "1", "the current job finished; nothing recomputed"
    assert transform.wait(timeout=30) == 0, "the worker exited after its job was handed on"
    assert_exactly_one_video(make_s3_client(s3_config), s3_config.bucket, record)
    FIGURES.append({"fault": "SIGTERM transform mid-job", "trials": 1, "completed": 1, "worst_recovery_s": 0.0})


def test_redis_restart_with_jobs_queued_and_running(s3_config: S3Config, tiny_model_dir: Path, tmp_path: Path) -> None:
    port, password = free_port(), "restart-test"
    server = start_valkey(tmp_path / "valkey", port, password)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    settings = farm_settings(url, s3_config, tiny_model_dir, tmp_path)
    conn = redis.Redis.from_url(url)
    fleet = WorkerFleet(settings)
    try:
        fleet.start(*Stage)
        job_ids = [submit(conn, settings, {**JOB, "steps": 2, "seed": i}) for i in range(20)]
        # A dequeue whose connection died before the worker started it, made by hand so every run has one:
        # the id sits in rq's intermediate list and only the reaper's stranded-dequeue pass brings it back.
        encode_queue = queues.stage_queue(conn, Stage.ENCODE)
        assert conn.lmove(encode_queue.key, encode_queue.intermediate_queue_key) is not None
        wait_until(lambda: jobs.job_fields(conn, job_ids[0]).get("transform.state") in ("running", "done"), 60, "work")
        time.sleep(1.5)  # appendfsync everysec: give the AOF its second
        server.stop()
        time.sleep(2.0)
        server = start_valkey(tmp_path / "valkey", port, password)
        records = [wait_finished(conn, j, timeout=240) for j in job_ids]
        assert [r["state"] for r in records] == ["succeeded"] * 20, worker_logs(settings)
        client = make_s3_client(s3_config)
        for record in records:
            assert_exactly_one_video(client, s3_config.bucket, record)
    finally:
        fleet.stop_all()
        server.stop()
    FIGURES.append(
        {"fault": "Valkey restart, 20 jobs queued/running", "trials": 20, "completed": 20, "worst_recovery_s": None}
    )


def test_expired_worker_records_are_re_registered_whole(farm: Farm) -> None:
    """A pause or Redis outage longer than the TTL expires worker records; each heartbeat must put its whole
    record back (endpoint included, counters kept), or consumers refuse the worker's outputs forever."""
    settings = farm.settings
    conn = farm.conn
    fleet = farm.fleet()
    fleet.start(*Stage)
    first = submit(conn, settings, {**JOB, "steps": 2})
    assert wait_finished(conn, first, timeout=120)["state"] == "succeeded", worker_logs(settings)
    before = {w["worker_id"]: w for w in live_workers(conn)}
    assert len(before) == 3
    for worker_id in before:
        conn.delete(keys.worker_key(worker_id))  # what expiry does
    wait_until(lambda: {w["worker_id"] for w in live_workers(conn)} == set(before), 15, "re-registration")
    for worker_id, record in {w["worker_id"]: w for w in live_workers(conn)}.items():
        assert (record["stage"], record["endpoint"]) == (before[worker_id]["stage"], before[worker_id]["endpoint"])
        assert record["jobs_done"] == "1" and record["state"] == "idle"
    second = wait_finished(conn, submit(conn, settings, {**JOB, "steps": 2, "seed": 5}), timeout=120)
    assert second["state"] == "succeeded" and second["failures"] == [], worker_logs(settings)


def test_s3_outage_within_and_past_the_retry_budget(tiny_model_dir: Path, tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    s3 = start_s3_server(tmp_path / "s3", port, "outage", "outage-secret")
    cfg = S3Config(f"http://127.0.0.1:{port}", "outage", "outage", "outage-secret")
    client = make_s3_client(cfg)
    ensure_bucket(client, cfg.bucket)
    settings = farm_settings(redis_url, cfg, tiny_model_dir, tmp_path)
    settings = settings.model_copy(
        update={
            "s3": settings.s3.model_copy(update={"retry_seconds": 12.0}),
            "worker": settings.worker.model_copy(update={"max_attempts": 2}),
        }
    )
    conn = redis.Redis.from_url(redis_url)
    fleet = WorkerFleet(settings)
    try:
        fleet.start(*Stage)
        # Down briefly, inside the retry budget: the jobs complete.
        s3.stop()
        brief = [submit(conn, settings, {**JOB, "steps": 2, "seed": i}) for i in range(3)]
        time.sleep(3.0)
        s3 = start_s3_server(tmp_path / "s3", port, "outage", "outage-secret")
        records = [wait_finished(conn, j, timeout=180) for j in brief]
        assert [r["state"] for r in records] == ["succeeded"] * 3, worker_logs(settings)
        for record in records:
            assert_exactly_one_video(client, cfg.bucket, record)
        # Down past the budget: the jobs fail with a storage reason and leave nothing behind.
        s3.stop()
        doomed = [submit(conn, settings, {**JOB, "steps": 2, "seed": 10 + i}) for i in range(2)]
        failed = [wait_finished(conn, j, timeout=240) for j in doomed]
        assert [r["state"] for r in failed] == ["failed"] * 2
        for record in failed:
            assert "quarantined" in record["error"]
            assert any("127.0.0.1" in f["reason"] or "S3" in f["reason"] for f in record["failures"]), record
        s3 = start_s3_server(tmp_path / "s3", port, "outage", "outage-secret")
        for job_id in doomed:
            assert objects_under(client, cfg.bucket, f"renders/{job_id}/") == []
        assert list_incomplete_uploads(client, cfg.bucket, "") == []
    finally:
        fleet.stop_all()
        s3.stop()
    FIGURES.append(
        {"fault": "S3 down 3 s (within budget) / past budget", "trials": 5, "completed": 5, "worst_recovery_s": None}
    )


def test_poison_job_is_quarantined_and_the_farm_keeps_serving(farm: Farm) -> None:
    settings = farm.settings
    conn = farm.conn
    fleet = farm.fleet({"REELFARM_FAULT_CRASH": "transform:POISON"})
    fleet.start(*Stage)
    poison = submit(conn, settings, {**JOB, "steps": 2, "prompt": "POISON pill"})
    deadline = time.monotonic() + 240
    while not jobs.JobState(jobs.read_status(conn, poison)["state"]).finished:
        assert time.monotonic() < deadline, "the poison job was never quarantined"
        fleet.respawn(Stage.TRANSFORM)  # as a supervisor would replace the crashed worker
        time.sleep(0.2)
    record = jobs.read_status(conn, poison)
    assert record["state"] == "failed"
    assert "quarantined after 3 attempts" in record["error"]
    assert len(record["failures"]) == 3
    fleet.respawn(Stage.TRANSFORM)
    healthy = submit(conn, settings, {**JOB, "steps": 2})
    assert wait_finished(conn, healthy, timeout=120)["state"] == "succeeded", worker_logs(settings)
    FIGURES.append(
        {"fault": "poison job (crashes transform every time)", "trials": 1, "completed": 0, "worst_recovery_s": None}
    )


def test_malformed_input_at_every_entry_point(farm: Farm) -> None:
    settings = farm.settings
    conn = farm.conn
    with pytest.raises(SpecError, match="frames"):
        submit(conn, settings, {**JOB, "frames": 16})
    with pytest.raises(ValueError, match="job id"):
        submit(conn, settings, JOB, job_id="../../etc")
    fleet = farm.fleet()
    fleet.start(*Stage)
    # A record planted by hand with a spec the farm cannot read.
    conn.hset(
        keys.job_key("planted"),
        mapping={
            "spec": "{not json",
            "state": "queued",
            "created_at": "0",
            "updated_at": "0",
            "encode.attempt": "1",
        },
    )
    queues.enqueue_stage(conn, "planted", Stage.ENCODE, 1, None, secret=settings.require_secret())
    # An rq job for a job that does not exist, and one with a garbage room.
    queues.enqueue_stage(conn, "ghost", Stage.ENCODE, 1, None, secret=settings.require_secret())
    planted = wait_finished(conn, "planted", timeout=60)
    assert planted["state"] == "failed" and "unreadable spec" in planted["error"]
    good = submit(conn, settings, {**JOB, "steps": 2})
    assert wait_finished(conn, good, timeout=120)["state"] == "succeeded", worker_logs(settings)
    assert fleet.all_alive(), "no worker crashed"


def test_zz_print_fault_table() -> None:
    """Prints the figures gathered above (run with -s); asserts the table covers what ran."""
    print("\n| fault | trials | completed | duplicates | orphans | worst recovery (s) |")
    print("|---|---|---|---|---|---|")
    for row in FIGURES:
        print(f"| {row['fault']} | {row['trials']} | {row['completed']} | 0 | 0 | {row['worst_recovery_s']} |")


def test_sigterm_during_a_redis_outage_still_stops_an_idle_worker(
    s3_config: S3Config, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port, password = free_port(), "outage-stop"
    server = start_valkey(tmp_path / "valkey", port, password)
    settings = farm_settings(f"redis://:{password}@127.0.0.1:{port}/0", s3_config, tiny_model_dir, tmp_path)
    fleet = WorkerFleet(settings)
    try:
        (encode,) = fleet.start(Stage.ENCODE)
        server.stop()
        time.sleep(3.0)  # let the worker fall into rq's reconnect loop
        encode.send_signal(signal.SIGTERM)
        assert encode.wait(timeout=30) == 0
    finally:
        fleet.stop_all()
        server.stop()
