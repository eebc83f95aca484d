"""Least privilege inside the farm (issue 26): the ACL file ``reelfarm redis-acl`` writes, loaded by a real
Valkey. Each role does its job and is refused (NOPERM) outside it, and a farm whose workers, front and
submitter each log in as their own role completes jobs and recovers from a worker SIGKILL.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient

from scheduler.cli import main
from scheduler.core import jobs, keys
from scheduler.core.keys import Stage
from scheduler.core.settings import FetchSettings, HttpSettings, WebhookEndpoint, api_key_hash
from scheduler.http.app import create_app
from scheduler.http.server import housekeeping_tasks
from scheduler.http.state import Front
from scheduler.intake.submit import submit
from scheduler.local.processes import ManagedServer, free_port, log_size, spawn, wait_ready, write_private
from scheduler.local.valkey import find_valkey_binary, valkey_config
from tests.farm_harness import WorkerFleet, farm_settings, wait_finished, wait_until, worker_logs

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {"prompt": "a fox under ACLs", "width": 64, "height": 48, "frames": 17, "steps": 8}
_URL = re.compile(r"^(\w+)\s+(redis://\S+)", re.MULTILINE)


@dataclass
class AclValkey:
    server: ManagedServer
    urls: dict[str, str]  # role -> redis URL with its credentials

    def connect(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.urls[role])


def _start(acl_file: Path, data_dir: Path, port: int) -> ManagedServer:
    # The embedded farm's own config, with the ACL file in place of the default user's password.
    text = valkey_config(data_dir, port, "unused")
    text = re.sub(r"^requirepass .*$", f'aclfile "{acl_file}"', text, flags=re.MULTILINE)
    conf = write_private(data_dir / "valkey.conf", text)
    log_path = data_dir / "valkey.log"
    mark = log_size(log_path)
    proc = spawn([str(find_valkey_binary()), str(conf)], log_path, data_dir, None, True)
    server = ManagedServer("valkey", proc.pid, port, log_path, data_dir, f"redis://127.0.0.1:{port}", process=proc)
    return server, mark  # type: ignore[return-value]


@pytest.fixture
def acl_valkey(tmp_path: Path) -> Iterator[AclValkey]:
    port = free_port()
    acl_file = tmp_path / "users.acl"
    written = CliRunner().invoke(
        main, ["redis-acl", "--out", str(acl_file), "--url", f"redis://127.0.0.1:{port}/0"], env={}
    )
    assert written.exit_code == 0, written.output
    urls = dict(_URL.findall(written.output))
    assert set(urls) == {"worker", "http", "scheduler", "keda", "admin"}
    text = acl_file.read_text()
    assert all(url.rpartition(":")[2].split("@")[0] not in text for url in urls.values())  # digests only
    assert acl_file.stat().st_mode & 0o077 == 0
    data_dir = tmp_path / "valkey"
    data_dir.mkdir()
    server, mark = _start(acl_file, data_dir, port)  # type: ignore[misc]
    admin = redis.Redis.from_url(urls["admin"], socket_connect_timeout=0.5)

    def ready() -> str | None:
        try:
            admin.ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            return str(exc)
        return None

    try:
        wait_ready(server, ready, 20.0, mark)
        yield AclValkey(server, urls)
    finally:
        admin.close()
        server.stop()


def _refused(call: Any) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        call()


def test_each_role_does_its_job_and_is_refused_outside_it(acl_valkey: AclValkey) -> None:
    worker, http, scheduler = (acl_valkey.connect(r) for r in ("worker", "http", "scheduler"))
    keda, admin = acl_valkey.connect("keda"), acl_valkey.connect("admin")
    # No anonymous access: the default user is off.
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=acl_valkey.server.port).ping()

    worker.hset(keys.worker_key("w1"), "stage", "encode")
    worker.rpush(keys.demand_key(Stage.ENCODE), "1")
    worker.hset(keys.job_key("j1"), "state", "running")
    # The front and the CLI read worker records but cannot rewrite them, nor rooms, acks or in-flight calls.
    for reader in (http, scheduler):
        assert reader.hget(keys.worker_key("w1"), "stage") == b"encode"
        _refused(lambda r=reader: r.hset(keys.worker_key("w1"), "stage", "evil"))
        _refused(lambda r=reader: r.delete(keys.acks_key("w1")))
        _refused(lambda r=reader: r.zadd(keys.inflight_key(), {"x": 1}))
        reader.hset(keys.job_key("j2"), "state", "queued")  # submitting is their job
        reader.hset(keys.batch_key("b1"), "name", "b1")
    http.hset(keys.api_file_key("file-1"), "filename", "in.jsonl")
    # Workers and the CLI never touch the front's files, batches or webhooks.
    for outsider in (worker, scheduler):
        _refused(lambda o=outsider: o.hget(keys.api_file_key("file-1"), "filename"))
        _refused(lambda o=outsider: o.set(keys.webhook_event_key("evt_1"), "{}"))
    _refused(lambda: worker.hset(keys.batch_key("b1"), "name", "evil"))
    # KEDA reads the demand lists' lengths, and nothing else.
    assert keda.llen(keys.demand_key(Stage.ENCODE)) == 1
    _refused(lambda: keda.rpush(keys.demand_key(Stage.ENCODE), "1"))
    _refused(lambda: keda.hget(keys.job_key("j1"), "state"))
    _refused(lambda: keda.llen(keys.job_key("j1")))
    # No service role runs server-wide commands.
    for service in (worker, http, scheduler):
        _refused(service.flushall)
        _refused(lambda s=service: s.config_set("appendonly", "no"))
        _refused(lambda s=service: s.keys("*"))
        _refused(lambda s=service: s.acl_list())
    assert admin.dbsize() >= 4


def test_the_farm_completes_jobs_and_survives_a_worker_sigkill_under_the_acls(
    acl_valkey: AclValkey, s3_config: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = farm_settings(acl_valkey.urls["admin"], s3_config, tiny_model_dir, tmp_path)
    as_role = {role: base.model_copy(update={"redis_url": acl_valkey.urls[role]}) for role in acl_valkey.urls}
    api_key = "rf-acl-test-key"
    # A webhook nobody answers: the front's outbox and retries run under its role too.
    hook = WebhookEndpoint(url=f"http://127.0.0.1:{free_port()}/hook", secret="whsec_" + "a" * 32)
    front_settings = as_role["http"].model_copy(
        update={
            "http": HttpSettings(api_key_hashes=[api_key_hash(api_key)], webhooks=[hook]),
            "fetch": FetchSettings(allow=["127.0.0.1"]),
        }
    )
    fleet = WorkerFleet(as_role["worker"], {"REELFARM_FAULT_SLOW": "transform:1.5"})
    scheduler = acl_valkey.connect("scheduler")
    try:
        fleet.start(*Stage)
        # One job from the CLI's role, one through the HTTP front's.
        cli_job = submit(scheduler, as_role["scheduler"], {**JOB, "seed": 1})
        with TestClient(create_app(front_settings)) as http:
            answer = http.post(
                "/v1/videos",
                json={"prompt": "through the front", "size": "64x48", "seconds": "1", "seed": 2, "steps": 2},
                headers={"Authorization": f"Bearer {api_key}"},
            )
            assert answer.status_code == 200, answer.text
            http_job = answer.json()["id"]
            auth = {"Authorization": f"Bearer {api_key}"}
        # Kill the transform worker mid-job, as an OOM kill would; a new one takes over.
        wait_until(lambda: jobs.job_fields(scheduler, cli_job).get("transform.state") == "running", 90, "transform")
        time.sleep(0.5)
        fleet.sigkill(Stage.TRANSFORM)
        fleet.start(Stage.TRANSFORM)
        for job_id in (cli_job, http_job):
            record = wait_finished(scheduler, job_id, timeout=180)
            assert record["state"] == "succeeded", worker_logs(as_role["worker"])
        assert wait_finished(scheduler, cli_job, timeout=1)["failures"], "the kill landed mid-job: a restart recorded"
        # The front's reads and deletes, and its background work (admission, events, outbox, sweep), as http.
        front = Front.from_settings(front_settings)
        tasks = housekeeping_tasks(front)
        with TestClient(create_app(front_settings, front)) as http:
            assert http.get(f"/v1/videos/{http_job}", headers=auth).json()["status"] == "completed"
            assert http.get("/metrics", headers=auth).status_code == 200
            for task in tasks:
                task()
            assert front.conn.zcard(keys.webhook_outbox_key()) == 1  # the event waits for its receiver
            assert http.delete(f"/v1/videos/{http_job}", headers=auth).status_code == 200
            for task in tasks:
                task()
        assert not front.conn.exists(keys.job_key(http_job))  # swept
        assert "NOPERM" not in worker_logs(as_role["worker"])
    finally:
        fleet.stop_all()
        scheduler.close()
