"""The farm over Redis TLS (``rediss://`` with a CA) as an ACL user, against a real TLS-only redis-server.

A real encode worker connects, registers, heartbeats and runs a job's first stage over TLS; a client that
lacks the CA, the right ACL password or TLS at all is refused with one line saying what to fix.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import redis

from scheduler.core import demand, jobs
from scheduler.core.connection import FarmUnreachable, connect_redis
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings, TransferSettings, WorkerSettings
from scheduler.intake.submit import submit
from tests.farm_harness import running_workers, wait_until, worker_logs
from tests.tls_redis import TlsRedis

SPEC = {"prompt": "a lighthouse at dusk", "width": 64, "height": 48, "frames": 5, "steps": 2, "seed": 3}


def tls_settings(tls_redis: TlsRedis, model_dir: Path, home: Path) -> FarmSettings:
    return FarmSettings(
        redis_url=tls_redis.url(),
        redis_ca_file=tls_redis.ca_file,
        model_dir=model_dir,
        secret=secrets.token_hex(16),
        home=home,
        transfer=TransferSettings(slots=2, slot_mb=4),
        worker=WorkerSettings(heartbeat_seconds=0.5, worker_ttl_seconds=4, reaper_interval_seconds=1.0),
    )


def test_a_worker_runs_a_stage_over_tls_as_an_acl_user(
    tls_redis: TlsRedis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = tls_settings(tls_redis, tiny_model_dir, tmp_path)
    conn = connect_redis(settings)
    conn.flushall()
    assert conn.acl_whoami() == "reelfarm"
    # Own farm: its worker reaches Redis over TLS only.
    with running_workers(settings, [Stage.ENCODE]):
        job_id = submit(conn, settings, SPEC)

        def encoded() -> bool:
            return jobs.read_status(conn, job_id)["stages"]["encode"]["state"] == "done"

        wait_until(encoded, 120, "the encode stage to finish over TLS")
        # The encode worker's maintenance pass (over TLS too) counts the handed-on job as transform demand.
        wait_until(lambda: demand.read_demand(conn)[Stage.TRANSFORM] >= 1, 30, "the transform demand")
    assert jobs.read_status(conn, job_id)["stages"]["encode"]["state"] == "done", worker_logs(settings)


def test_tls_and_acl_refusals_say_what_to_fix(tls_redis: TlsRedis, tmp_path: Path) -> None:
    with pytest.raises(FarmUnreachable, match="does not trust.*set REELFARM_REDIS_CA_FILE"):
        connect_redis(FarmSettings(redis_url=tls_redis.url()))
    with pytest.raises(FarmUnreachable, match="refused user 'reelfarm'"):
        connect_redis(FarmSettings(redis_url=tls_redis.url(password="wrong"), redis_ca_file=tls_redis.ca_file))
    with pytest.raises(FarmUnreachable, match="requires authentication and REELFARM_REDIS_URL gives none"):
        connect_redis(FarmSettings(redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0", redis_ca_file=tls_redis.ca_file))
    with pytest.raises(FarmUnreachable, match=r"use rediss://"):
        connect_redis(FarmSettings(redis_url=tls_redis.url().replace("rediss://", "redis://")))
    with pytest.raises(FarmUnreachable, match="is not a readable file"):
        connect_redis(FarmSettings(redis_url=tls_redis.url(), redis_ca_file=tmp_path / "missing.pem"))
    # The ACL user is the only way in: the default user is off.
    with pytest.raises(redis.RedisError):
        redis.Redis(host="127.0.0.1", port=tls_redis.port, ssl=True, ssl_ca_certs=str(tls_redis.ca_file)).ping()
