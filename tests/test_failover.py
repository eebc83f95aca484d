"""Redis failover (issue 25) on an embedded HA Valkey: a primary, a replica and three Sentinels on loopback.

The farm connects through ``redis+sentinel://``; real worker processes, real Mooncake TCP, SeaweedFS and ffmpeg.
``kill -9`` of the primary mid-batch, and right after a submit returned: Sentinel promotes the replica, the
farm follows it, and every job that got an id ends SUCCEEDED with exactly one video or FAILED with a reason.
Recovery times are printed as rows of the fault suite's table (run with ``-s``).
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.core import durability, jobs
from scheduler.core.connection import connect_redis
from scheduler.core.keys import Stage
from scheduler.core.object_store import S3Config, get_bytes, make_s3_client
from scheduler.core.settings import FarmSettings
from scheduler.intake.submit import submit
from scheduler.local.valkey_ha import HaValkey, start_ha_valkey
from scheduler.ops.batch import submit_batch
from scheduler.ops.batch_file import parse_batch, specs_to_text
from tests.farm_harness import WorkerFleet, farm_settings, wait_until, worker_logs
from tests.video_probe import probe_frame_count

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 64, "height": 48, "frames": 9, "steps": 2}
FIGURES: list[dict[str, Any]] = []


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HaValkey]:
    servers = start_ha_valkey(tmp_path / "ha", secrets.token_hex(12))
    try:
        yield servers
    finally:
        servers.stop()


def test_acknowledged_writes_wait_for_the_replica_and_a_timeout_is_reported(ha: HaValkey, tmp_path: Path) -> None:
    settings = FarmSettings(redis_url=ha.url, home=tmp_path / "farm", redis_wait_timeout_seconds=0.3)
    conn = connect_redis(settings)
    assert durability.confirm(conn, settings, "submit")
    assert ha.replica.process is not None
    ha.replica.process.send_signal(signal.SIGSTOP)  # the replica stops acknowledging
    try:
        started = time.monotonic()
        assert not durability.confirm(conn, settings, "submit")
        assert time.monotonic() - started >= 0.3
        assert durability.timeout_counts(conn) == {"submit": 1}
        local = settings.model_copy(update={"redis_durability": "local"})
        assert durability.confirm(conn, local, "submit"), "local durability never waits"
    finally:
        ha.replica.process.send_signal(signal.SIGCONT)


def _kill_primary(ha: HaValkey) -> float:
    assert ha.primary.process is not None
    ha.primary.process.send_signal(signal.SIGKILL)
    ha.primary.process.wait()
    return time.monotonic()


def _settle(conn: redis.Redis, settings: FarmSettings, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """Every job's final record (reads retried through the failover); fails if one is missing or unfinished."""
    deadline = time.monotonic() + timeout
    records: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(records) < len(job_ids):
        for job_id in job_ids:
            if job_id in records:
                continue
            try:
                record = jobs.read_status(conn, job_id)  # JobNotFound: a submission the failover lost
            except redis.ConnectionError:
                break
            if jobs.JobState(record["state"]).finished:
                records[job_id] = record
        time.sleep(0.2)
    unfinished = sorted(set(job_ids) - set(records))
    assert not unfinished, f"{len(unfinished)} jobs unfinished: {unfinished[:3]}\n{worker_logs(settings)}"
    return [records[job_id] for job_id in job_ids]


def _assert_outcomes(settings: FarmSettings, s3_config: S3Config, records: list[dict[str, Any]]) -> int:
    """SUCCEEDED with exactly one video at its key, or FAILED with a reason; returns how many succeeded."""
    client = make_s3_client(s3_config)
    succeeded = 0
    for record in records:
        if record["state"] == "failed":
            assert record["error"], record
            continue
        assert record["state"] == "succeeded", record
        stem = record["result"]["video_key"].rsplit("/", 1)[0]
        listed = client.list_objects_v2(Bucket=settings.s3.bucket, Prefix=stem + "/").get("Contents", [])
        assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == ["metadata.json", "poster.jpg", "video.mp4"]
        assert probe_frame_count(get_bytes(client, settings.s3.bucket, record["result"]["video_key"])) == JOB["frames"]
        succeeded += 1
    return succeeded


def _count(conn: redis.Redis, job_ids: list[str], state: str) -> int:
    try:
        return sum(1 for job_id in job_ids if jobs.job_fields(conn, job_id).get("state") == state)
    except redis.ConnectionError:
        return 0


@dataclass
class HaFarm:
    settings: FarmSettings
    conn: redis.Redis
    fleet: WorkerFleet


@pytest.fixture
def ha_farm(ha: HaValkey, s3_config: S3Config, tiny_model_dir: Path, tmp_path: Path) -> Iterator[HaFarm]:
    """One worker per stage on the HA Valkey, connected through its Sentinels."""
    settings = farm_settings(ha.url, s3_config, tiny_model_dir, tmp_path)
    fleet = WorkerFleet(settings)
    try:
        fleet.start(*Stage)
        yield HaFarm(settings, connect_redis(settings), fleet)
    finally:
        fleet.stop_all()


def test_primary_killed_mid_batch_loses_no_job_and_duplicates_no_video(
    ha: HaValkey, ha_farm: HaFarm, s3_config: S3Config
) -> None:
    settings, conn = ha_farm.settings, ha_farm.conn
    parsed = parse_batch(specs_to_text([{**JOB, "seed": n} for n in range(30)]), settings, name="failover")
    submit_batch(conn, settings, parsed)
    job_ids = parsed.job_ids
    # Jobs in every stage: some finished (decode ran), the rest still queued or running upstream.
    wait_until(lambda: _count(conn, job_ids, "succeeded") >= 2, 120, "the first videos")
    old_primary = ha.primary.port
    killed = _kill_primary(ha)
    wait_until(lambda: ha.primary_port_now() != old_primary, 30, "Sentinel to promote the replica")
    promoted = time.monotonic() - killed
    done_before = _count(conn, job_ids, "succeeded")
    wait_until(lambda: _count(conn, job_ids, "succeeded") > done_before, 60, "a job to finish after the failover")
    resumed = time.monotonic() - killed
    records = _settle(conn, settings, job_ids, timeout=150)
    succeeded = _assert_outcomes(settings, s3_config, records)
    assert ha_farm.fleet.all_alive(), worker_logs(settings)
    print(
        f"\nprimary killed mid-batch: replica promoted after {promoted:.1f}s, jobs finishing again after {resumed:.1f}s"
    )
    FIGURES.append({"fault": "Redis primary failover mid-batch (30 jobs)", "completed": succeeded, "seconds": resumed})
    assert succeeded == len(job_ids), "nothing here fails a job: every one must complete"


def test_primary_killed_right_after_submit_returns_keeps_the_job(
    ha: HaValkey, ha_farm: HaFarm, s3_config: S3Config
) -> None:
    settings, conn = ha_farm.settings, ha_farm.conn
    job_ids = [submit(conn, settings, {**JOB, "seed": n}) for n in range(5)]
    killed = _kill_primary(ha)  # the instant the last submit returned its id
    records = _settle(conn, settings, job_ids, timeout=150)
    finished = time.monotonic() - killed
    succeeded = _assert_outcomes(settings, s3_config, records)
    print(f"\nprimary killed right after submit: all {len(job_ids)} jobs finished {finished:.1f}s after the kill")
    FIGURES.append({"fault": "Redis failover right after submit (5 jobs)", "completed": succeeded, "seconds": finished})
    assert succeeded == len(job_ids)


def test_zz_print_fault_rows() -> None:
    """Prints this module's rows of the fault suite's table (run with -s)."""
    print("\n| fault | trials | completed | duplicates | orphans | worst recovery (s) |")
    print("|---|---|---|---|---|---|")
    for row in FIGURES:
        print(f"| {row['fault']} | 1 | {row['completed']} | 0 | 0 | {row['seconds']:.1f} |")
