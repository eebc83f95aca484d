"""reelfarm across hosts: every part in a network namespace of its own, joined by veths on a private switch.

Valkey and the S3 server run on host ``svc``; the encode worker on ``enc``, two transform workers on
``tra1`` and ``tra2``, the decode worker on ``dec``; the test submits from ``sub``. Each worker advertises
its own address, so every Mooncake hand-off crosses the veths. Three things are shown:

1. a job completes with frames equal to the one-process reference (what the loopback farm also equals);
2. the transform host that produced a job's latents loses its link after it published and before the
   decode worker pulled (the decode worker pauses before its pull): the job completes through recovery,
   its DiT stage recomputed on the other transform host;
3. a transform host is partitioned from Redis mid-job for longer than the worker TTL, then healed: the
   farm restarts the stage on the other host, the stale attempt is fenced (one decode, one video, no
   stray upload) and the healed worker re-registers.

Skips, saying why, where namespaces cannot be created (not root, no iproute2).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from scheduler.core import jobs, worker_registry
from scheduler.core.connection import connect_redis
from scheduler.core.keys import Stage
from scheduler.core.object_store import get_bytes, list_incomplete_uploads
from scheduler.core.settings import CheckpointSettings, FarmSettings, S3Settings, TransferSettings, WorkerSettings
from scheduler.intake.submit import submit
from scheduler.local.embedded import start_worker, wait_for_workers
from scheduler.local.processes import stop_pid
from tests.farm_harness import wait_until
from tests.netns_lab import Host, NamespacesUnavailable, NetnsLab
from tests.reference_pipeline import reference_frames
from tests.test_end_to_end import SPEC as LOOPBACK_SPEC
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow

# The loopback end-to-end test's job: its frames equal the same reference there.
SPEC: dict[str, Any] = LOOPBACK_SPEC
# Prompt markers the fault points match (workers/fault_injection.py): only the job that carries one pauses.
CUT_MARKER, SLOW_MARKER = "cut-the-producer", "partition-the-dit"
DECODE_PULL_PAUSE = 7.0  # > worker_ttl_seconds: the cut producer's record expires before the pull
TRANSFORM_PAUSE = 12.0  # the partitioned transform worker is still mid-job when healed
TTL = 4


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    made = NetnsLab()
    try:
        made.open()
    except NamespacesUnavailable as exc:
        made.close()
        pytest.skip(f"network namespaces cannot be created here: {exc}")
    try:
        yield made
    finally:
        made.close()


class MultiHostFarm:
    """The farm of the test: servers on ``svc``, workers on their own hosts, the test on ``sub``."""

    def __init__(self, lab: NetnsLab, settings: FarmSettings, sub: Host) -> None:
        self.lab, self.settings, self.sub = lab, settings, sub
        self.conn: redis.Redis = sub.run(connect_redis, settings)
        self.s3: Any = sub.run(settings.s3.client)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def status(self, job_id: str) -> dict[str, Any]:
        return self.sub.run(jobs.read_status, self.conn, job_id)

    def stage(self, job_id: str, stage: Stage) -> dict[str, str]:
        return dict(self.status(job_id)["stages"].get(stage.value, {}))

    def finished(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        wait_until(lambda: jobs.JobState(self.status(job_id)["state"]).finished, timeout, f"job {job_id}", 0.2)
        return self.status(job_id)

    def host_of_worker(self, worker_id: str) -> Host:
        record = self.sub.run(worker_registry.get_worker, self.conn, worker_id)
        assert record is not None, f"worker {worker_id} is not registered"
        return self.lab.host_of(record["endpoint"].rsplit(":", 1)[0])

    def video(self, record: dict[str, Any]) -> np.ndarray:
        data = self.sub.run(get_bytes, self.s3, self.settings.s3.bucket, record["result"]["video_key"])
        return decode_video_frames(data)

    def logs(self) -> str:
        log_dir = self.settings.home / "logs"
        return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(log_dir.glob("*.log")))


@pytest.fixture
def farm(lab: NetnsLab, tiny_model_dir: Path, tmp_path: Path) -> Iterator[MultiHostFarm]:
    svc, sub = lab.add_host("svc"), lab.add_host("sub")
    placement = {"enc": Stage.ENCODE, "tra1": Stage.TRANSFORM, "tra2": Stage.TRANSFORM, "dec": Stage.DECODE}
    hosts = {name: lab.add_host(name) for name in placement}
    services_dir = tmp_path / "services"
    services_dir.mkdir()
    services = subprocess.Popen(
        [*svc.launcher, sys.executable, "-m", "tests.netns_services", str(services_dir), svc.address],
        stdout=(tmp_path / "services.log").open("ab"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],  # `tests` is a package of the checkout
    )
    ready_file = services_dir / "ready.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wait_until(lambda: ready_file.exists() or services.poll() is not None, 90, "Valkey and S3 on host svc", 0.2)
        assert ready_file.exists(), (tmp_path / "services.log").read_text()[-3000:]
        ready = json.loads(ready_file.read_text())
        settings = FarmSettings(
            redis_url=ready["redis_url"],
            model_dir=tiny_model_dir,
            secret=secrets.token_hex(16),
            home=tmp_path / "home",
            s3=S3Settings(
                endpoint_url=ready["s3_endpoint"],
                bucket="multi-host",
                access_key=ready["access_key"],
                secret_key=ready["secret_key"],
            ),
            transfer=TransferSettings(slots=2, slot_mb=4, transfer_timeout_seconds=5),
            worker=WorkerSettings(
                heartbeat_seconds=0.5,
                worker_ttl_seconds=TTL,
                lease_seconds=60,
                reaper_interval_seconds=1.0,
                retry_backoff_seconds=0.2,
            ),
            # Lineage across hosts is what this test checks: with latent checkpoints on, a decode that cannot
            # pull from a cut producer reads the checkpoint from S3 instead (tests/test_checkpoints.py).
            checkpoints=CheckpointSettings(enabled=False),
        )
        faults = {
            Stage.TRANSFORM: f"transform:{TRANSFORM_PAUSE}:{SLOW_MARKER}",
            Stage.DECODE: f"decode-pull:{DECODE_PULL_PAUSE}:{CUT_MARKER}",
        }
        log_dir = settings.home / "logs"
        made = MultiHostFarm(lab, settings, sub)
        for name, stage in placement.items():
            env = {"REELFARM_TRANSFER_HOSTNAME": hosts[name].address}
            if stage in faults:
                env["REELFARM_FAULT_SLOW"] = faults[stage]
            proc = start_worker(stage, settings, log_dir, env, launcher=hosts[name].launcher, log_name=name)
            procs.append(proc)
            made.workers[name] = proc
        sub.run(wait_for_workers, settings, list(placement.values()), procs, log_dir)
        yield made
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # their hosts are about to vanish: nothing to drain for
        for proc in procs:
            proc.wait()
        services.terminate()
        try:
            services.wait(timeout=15)
        except subprocess.TimeoutExpired:
            services.kill()
            services.wait()
        if ready_file.exists():
            for pid in json.loads(ready_file.read_text())["pids"]:
                stop_pid(pid, timeout=3.0)


def test_jobs_cross_hosts_survive_a_cut_producer_and_a_partitioned_worker(
    farm: MultiHostFarm, tiny_model_dir: Path
) -> None:
    started = time.monotonic()
    # Every worker registered the address of its own host.
    records = farm.sub.run(worker_registry.live_workers, farm.conn)
    assert {farm.host_of_worker(r["worker_id"]).name for r in records} == {"enc", "tra1", "tra2", "dec"}

    # 1. Hand-offs across hosts give the reference frames.
    first = farm.sub.run(submit, farm.conn, farm.settings, SPEC)
    record = farm.finished(first)
    assert record["state"] == "succeeded", farm.logs()
    reference = reference_frames(tiny_model_dir, SPEC)
    frames = farm.video(record)
    assert frames.shape == reference.shape
    assert np.abs(frames.astype(np.int16) - reference.astype(np.int16)).max() <= 1

    # 2. The host that produced the latents loses its link after publishing, before the decode worker pulls.
    cut_spec = {**SPEC, "prompt": f"{SPEC['prompt']} {CUT_MARKER}"}
    second = farm.sub.run(submit, farm.conn, farm.settings, cut_spec)
    wait_until(lambda: farm.stage(second, Stage.DECODE).get("state") == "running", 60, "decode to claim job 2", 0.1)
    producer = farm.host_of_worker(farm.stage(second, Stage.TRANSFORM)["worker"])
    producer_id = farm.stage(second, Stage.TRANSFORM)["worker"]
    producer.cut()
    record = farm.finished(second)
    assert record["state"] == "succeeded", farm.logs()
    assert int(record["stages"]["transform"]["attempt"]) >= 2, record
    assert farm.host_of_worker(record["stages"]["transform"]["worker"]) is not producer
    assert any("input lost" in f.get("reason", "") for f in record["failures"]), record["failures"]
    assert farm.video(record).shape == reference.shape

    # ... healed after more than the TTL: the worker re-registers.
    assert farm.sub.run(worker_registry.get_worker, farm.conn, producer_id) is None
    producer.heal()
    wait_until(lambda: farm.sub.run(worker_registry.get_worker, farm.conn, producer_id), 20, "re-registration", 0.2)

    # 3. A transform host is partitioned from Redis mid-job for longer than the TTL, then healed.
    slow_spec = {**SPEC, "prompt": f"{SPEC['prompt']} {SLOW_MARKER}", "seed": 77}
    third = farm.sub.run(submit, farm.conn, farm.settings, slow_spec)
    wait_until(lambda: farm.stage(third, Stage.TRANSFORM).get("state") == "running", 60, "transform of job 3", 0.1)
    partitioned_id = farm.stage(third, Stage.TRANSFORM)["worker"]
    partitioned = farm.host_of_worker(partitioned_id)
    partitioned.cut()
    # The farm gives up on it (TTL + a reaper pass) and restarts the stage; the worker is still mid-job.
    wait_until(lambda: int(farm.stage(third, Stage.TRANSFORM).get("attempt", 1)) >= 2, 30, "the restart", 0.2)
    partitioned.heal()
    record = farm.finished(third)
    assert record["state"] == "succeeded", farm.logs()
    assert farm.stage(third, Stage.TRANSFORM)["worker"] != partitioned_id
    # One decode, one video at the job's key, no stray upload: the stale attempt was fenced when it finished.
    assert record["stages"]["decode"]["attempt"] == "1", record
    stem = record["result"]["video_key"].rsplit("/", 1)[0]
    listed = farm.sub.run(farm.s3.list_objects_v2, Bucket=farm.settings.s3.bucket, Prefix=f"{stem}/")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]) == [
        "metadata.json",
        "poster.jpg",
        "video.mp4",
    ]
    assert farm.sub.run(list_incomplete_uploads, farm.s3, farm.settings.s3.bucket, "") == []
    wait_until(lambda: farm.sub.run(worker_registry.get_worker, farm.conn, partitioned_id), 20, "re-registration", 0.2)
    # The stale attempt finished after the heal and was discarded, not published.
    wait_until(lambda: "superseded" in farm.logs() or "stale" in farm.logs(), 30, "the stale attempt to end", 0.5)
    assert all(proc.poll() is None for proc in farm.workers.values()), farm.logs()
    print(f"multi-host scenarios took {time.monotonic() - started:.1f}s")
