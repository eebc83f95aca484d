"""Never lose DiT work (issue 15), on a real farm: real worker processes, Valkey, Mooncake TCP, SeaweedFS, ffmpeg.

Latent checkpoints replace a lost hand-off or a failed decode; ``decode-from`` re-renders from them;
a transform killed or preempted mid-denoise resumes from its last save on another worker with the same
frames; cancel and completion leave no checkpoint behind.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from scheduler.core import jobs, keys, queues, recovery
from scheduler.core.keys import Stage
from scheduler.core.object_store import S3Config, get_bytes, make_s3_client, object_exists
from scheduler.core.settings import CheckpointSettings
from scheduler.intake.submit import submit
from scheduler.ops import job_admin, rerender
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs
from tests.video_probe import probe_frame_count

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 64, "height": 48, "frames": 17, "steps": 8}
LOSSLESS = {**JOB, "codec": {"name": "lossless"}}


def checkpoints_of(farm: Farm, job_id: str) -> list[str]:
    client = make_s3_client(_s3(farm))
    listed = client.list_objects_v2(Bucket=farm.settings.s3.bucket, Prefix=f"checkpoints/{job_id}/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _s3(farm: Farm) -> S3Config:
    s3 = farm.settings.s3
    return S3Config(s3.endpoint_url, s3.bucket, s3.access_key, s3.secret_key)


def in_store(farm: Farm) -> Callable[[str], bool]:
    client = make_s3_client(_s3(farm))
    return lambda key: object_exists(client, farm.settings.s3.bucket, key)


def transform_field(farm: Farm, job_id: str, name: str) -> str | None:
    return jobs.job_fields(farm.conn, job_id).get(f"transform.{name}")


def frames_digest(farm: Farm, record: dict[str, Any]) -> str:
    """The SHA-256 of every decoded frame (the decode worker's metadata), for lossless comparisons."""
    key = record["result"]["video_key"].rsplit("/", 1)[0] + "/metadata.json"
    return str(json.loads(get_bytes(make_s3_client(_s3(farm)), farm.settings.s3.bucket, key))["frames_sha256"])


def test_decode_reads_the_checkpoint_when_the_transform_worker_died_after_publishing(farm: Farm) -> None:
    conn = farm.conn
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE, Stage.TRANSFORM)  # no decoder yet: nobody pulls
    job_id = submit(conn, farm.settings, JOB)
    wait_until(lambda: transform_field(farm, job_id, "checkpoint"), 90, "the latents checkpoint")
    assert jobs.job_fields(conn, job_id)["decode.state"] == "queued", "published, not pulled"
    fleet.sigkill(Stage.TRANSFORM)
    fleet.start(Stage.DECODE)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    transform, decode = record["stages"]["transform"], record["stages"]["decode"]
    assert decode["recovery"] == "from checkpoint (transform attempt 1)"
    assert transform["steps_computed"] == "8" and transform["attempt"] == "1", "the DiT ran once"
    assert record["stages"]["encode"]["attempt"] == "1", "no lineage recompute"
    assert (
        probe_frame_count(get_bytes(make_s3_client(_s3(farm)), farm.settings.s3.bucket, record["result"]["video_key"]))
        == 17
    )
    assert checkpoints_of(farm, job_id) == [], "completion deletes the checkpoints"


def test_a_decode_retried_after_failure_uses_the_checkpoint(farm: Farm) -> None:
    conn = farm.conn
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "decode:30"})
    fleet.start(*Stage)
    job_id = submit(conn, farm.settings, JOB)
    wait_until(lambda: jobs.job_fields(conn, job_id).get("decode.state") == "running", 90, "decode to start")
    wait_until(lambda: transform_field(farm, job_id, "checkpoint"), 30, "the latents checkpoint")
    fleet.sigkill(Stage.DECODE)  # after it pulled and acknowledged: the hand-off is gone
    fleet.extra_env = {}
    fleet.start(Stage.DECODE)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    assert record["stages"]["decode"]["attempt"] == "2"
    assert record["stages"]["decode"]["recovery"] == "from checkpoint (transform attempt 1)"
    assert record["stages"]["transform"]["steps_computed"] == "8" and record["stages"]["transform"]["attempt"] == "1"
    assert [f["stage"] for f in record["failures"]] == ["decode"]


def test_decode_from_re_renders_with_another_codec_and_cancel_leaves_no_checkpoint(
    make_farm: Callable[..., Farm],
) -> None:
    farm = make_farm(checkpoints=CheckpointSettings(retention_days=1))
    conn = farm.conn
    fleet = farm.fleet()
    fleet.start(*Stage)
    job_id = submit(conn, farm.settings, JOB)
    first = wait_finished(conn, job_id, timeout=120)
    assert first["state"] == "succeeded" and first["result"]["codec"] == "h264", worker_logs(farm.settings)
    assert checkpoints_of(farm, job_id) == [f"checkpoints/{job_id}/transform-a1.latents"], "retention keeps it"

    secret = farm.settings.require_secret()
    queued = rerender.decode_from(conn, job_id, {"name": "lossless"}, secret=secret, checkpoint_exists=in_store(farm))
    assert queued == (Stage.DECODE, 2)
    again = wait_finished(conn, job_id, timeout=120)
    assert again["state"] == "succeeded", worker_logs(farm.settings)
    assert again["result"]["codec"] == "lossless" and again["result"]["sha256"] != first["result"]["sha256"]
    assert again["stages"]["decode"]["recovery"] == "from checkpoint (transform attempt 1)"
    assert again["stages"]["transform"]["steps_computed"] == "8", "no DiT step ran for the re-render"
    with pytest.raises(job_admin.JobAdminError, match="finished jobs only"):
        rerender.decode_from(
            conn, submit(conn, farm.settings, {**JOB, "seed": 9}), None, secret=b"x", checkpoint_exists=in_store(farm)
        )

    # The checkpoint vanishes after decode-from queued (an operator's cleanup): the decode-only re-render fails
    # with the reason instead of re-running encode and the DiT behind the user's back.
    fleet.sigkill(Stage.DECODE)
    assert rerender.decode_from(conn, job_id, None, secret=secret, checkpoint_exists=in_store(farm)).attempt == 3
    make_s3_client(_s3(farm)).delete_object(Bucket=farm.settings.s3.bucket, Key=checkpoints_of(farm, job_id)[0])
    fleet.start(Stage.DECODE)
    refused = wait_finished(conn, job_id, timeout=120)
    assert refused["state"] == "failed" and "never recomputes the DiT" in refused["error"], refused["error"]
    assert refused["stages"]["transform"]["attempt"] == "1" and refused["stages"]["transform"]["steps_computed"] == "8"
    assert refused["stages"]["encode"]["attempt"] == "1" and refused["recovery"] is None

    # Cancelled while its decode waits: the checkpoint goes with it.
    fleet.sigkill(Stage.DECODE)
    doomed = submit(conn, farm.settings, {**JOB, "seed": 7})
    wait_until(lambda: transform_field(farm, doomed, "checkpoint"), 90, "the latents checkpoint")
    assert job_admin.cancel_job(conn, doomed) == "cancelled"
    assert job_admin.drop_checkpoints(conn, farm.settings, doomed) == 1
    assert checkpoints_of(farm, doomed) == []


def test_decode_from_without_a_checkpoint_is_refused_at_once_and_recomputes_only_when_allowed(farm: Farm) -> None:
    conn = farm.conn
    fleet = farm.fleet()
    fleet.start(*Stage)
    job_id = submit(conn, farm.settings, JOB)  # retention_days 0 (the default): completion deletes the checkpoint
    first = wait_finished(conn, job_id, timeout=120)
    assert first["state"] == "succeeded" and checkpoints_of(farm, job_id) == [], worker_logs(farm.settings)
    before = jobs.job_fields(conn, job_id)
    assert "transform.checkpoint" in before, "the record still names the deleted checkpoint: the store decides"
    secret = farm.settings.require_secret()
    started = time.monotonic()
    with pytest.raises(job_admin.JobAdminError) as refused:
        rerender.decode_from(conn, job_id, {"name": "lossless"}, secret=secret, checkpoint_exists=in_store(farm))
    refused_seconds = time.monotonic() - started
    message = str(refused.value)
    assert "\n" not in message and "is gone" in message and "checkpoints.retention_days" in message, message
    assert "--allow-recompute" in message and "nothing was queued" in message
    assert jobs.job_fields(conn, job_id) == before, "the record is unchanged"
    assert sum(queues.stage_backlog(conn).values()) == 0, "nothing queued"
    assert refused_seconds < 2.0

    # Asked for: the whole job runs again, and the record and the metric say the DiT was recomputed.
    queued = rerender.decode_from(
        conn, job_id, {"name": "lossless"}, secret=secret, checkpoint_exists=in_store(farm), allow_recompute=True
    )
    assert queued.stage is Stage.ENCODE
    again = wait_finished(conn, job_id, timeout=120)
    assert again["state"] == "succeeded" and again["result"]["codec"] == "lossless", worker_logs(farm.settings)
    assert again["recovery"] == recovery.RECOMPUTED_DIT
    assert float(conn.get(keys.dit_recomputed_key()) or 0) == pytest.approx(
        float(first["stages"]["transform"]["seconds"])
    )


def test_sigkill_at_step_6_of_8_resumes_at_step_6_on_another_worker_with_the_same_frames(
    make_farm: Callable[..., Farm],
) -> None:
    farm = make_farm(checkpoints=CheckpointSettings(save_every_steps=2, save_min_steps=0))
    conn = farm.conn
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "transform-step-6:60"})
    fleet.start(*Stage)
    job_id = submit(conn, farm.settings, LOSSLESS)
    wait_until(lambda: json.loads(transform_field(farm, job_id, "resume") or "{}").get("step") == 6, 90, "save at 6")
    killed = fleet.worker(Stage.TRANSFORM).pid
    fleet.sigkill(Stage.TRANSFORM)
    fleet.extra_env = {}
    fleet.start(Stage.TRANSFORM)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    transform = record["stages"]["transform"]
    assert transform["recovery"] == "pulled; resumed at step 6" and transform["attempt"] == "2"
    assert f"-{killed}-" not in transform["worker"], "resumed on another worker"
    assert transform["steps_computed"] == "8", "steps 1-6 ran once, on the killed worker; 7-8 on the new one"
    assert checkpoints_of(farm, job_id) == []
    uninterrupted = wait_finished(conn, submit(conn, farm.settings, LOSSLESS, job_id="uninterrupted"), timeout=120)
    assert uninterrupted["stages"]["transform"].get("recovery") == "pulled"
    assert frames_digest(farm, record) == frames_digest(farm, uninterrupted)


def test_sigterm_at_step_5_of_8_saves_at_the_next_step_hands_back_and_exits(make_farm: Callable[..., Farm]) -> None:
    # No periodic saves: the resume point can only come from the preemption's own save.
    farm = make_farm(checkpoints=CheckpointSettings(save_every_steps=100, save_min_steps=0))
    conn = farm.conn
    # The worker waits after step 5, so the signal lands there however loaded the machine is.
    pause = 5.0
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": f"transform-step-5:{pause}"})
    fleet.start(*Stage)
    job_id = submit(conn, farm.settings, LOSSLESS)
    wait_until(lambda: transform_field(farm, job_id, "progress") == "5/8", 90, "step 5")
    worker = fleet.worker(Stage.TRANSFORM)
    signalled, signalled_wall = time.monotonic(), time.time()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    exit_seconds = time.monotonic() - signalled
    preempted = jobs.read_status(conn, job_id)
    handback_seconds = preempted["failures"][0]["at"] - signalled_wall
    assert preempted["failures"][0]["reason"] == (
        "preempted: worker stopping: handed back after step 6 of 8, state saved: True"
    ), "one more step, then the save and the hand-back: not the rest of the job"
    assert json.loads(preempted["stages"]["transform"]["resume"])["step"] == 6
    assert preempted["stages"]["transform"]["steps_computed"] == "6"
    fleet.extra_env = {}
    fleet.start(Stage.TRANSFORM)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    transform = record["stages"]["transform"]
    assert transform["recovery"] == "pulled; resumed at step 6" and transform["steps_computed"] == "8"
    uninterrupted = wait_finished(conn, submit(conn, farm.settings, LOSSLESS, job_id="uninterrupted"), timeout=120)
    assert frames_digest(farm, record) == frames_digest(farm, uninterrupted)
    # Both include what is left of the injected pause; the exit adds the worker's teardown (threads, engine).
    print(
        f"\nSIGTERM during step 5's pause: handed back after {handback_seconds:.2f}s, exited after {exit_seconds:.2f}s"
    )
    assert handback_seconds < pause + 10.0


def test_retention_sweep_deletes_only_checkpoints_past_the_window(s3_config: S3Config, s3_client: Any) -> None:
    from types import SimpleNamespace

    from scheduler.core.object_store import put_bytes
    from scheduler.core.settings import FarmSettings, S3Settings
    from workers import checkpoints

    window = CheckpointSettings(retention_days=1, orphan_days=0.5)  # the longer of the two applies
    settings = FarmSettings(s3=S3Settings(bucket=s3_config.bucket), checkpoints=window)
    rt: Any = SimpleNamespace(settings=settings, s3=s3_client)
    for key in ("checkpoints/a/transform-a1.latents", "renders/a/video.mp4"):
        put_bytes(s3_client, s3_config.bucket, key, b"x")
    listed = lambda: sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_config.bucket).get("Contents", []))  # noqa: E731
    now, later = time.time(), time.time() + 2 * 86400
    checkpoints._last_sweep = 0.0
    assert checkpoints.sweep_expired(rt, now=now) == 0, "a fresh checkpoint is inside the window"
    checkpoints._last_sweep = 0.0
    assert checkpoints.sweep_expired(rt, now=now + 0.8 * 86400) == 0, "within retention_days, past orphan_days"
    checkpoints._last_sweep = later - 60
    assert checkpoints.sweep_expired(rt, now=later) == 0, "at most one sweep an hour"
    checkpoints._last_sweep = 0.0
    assert checkpoints.sweep_expired(rt, now=later) == 1
    assert listed() == ["renders/a/video.mp4"], "only the checkpoint prefix is swept"
