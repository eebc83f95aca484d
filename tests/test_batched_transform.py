"""A transform worker that batches compatible jobs, on real parts: Valkey, worker processes, Mooncake TCP,
SeaweedFS, ffmpeg.

The jobs wait in the transform queue (encode ran first) when the transform worker starts, so it takes
one from rq and the others as batch-mates. Each job keeps its own record, progress, hand-off and
outcome: the frames of a batched job equal WanPipeline's (the farm's end-to-end tolerance), a job
cancelled mid-batch leaves at a step boundary, and a job whose input does not fit its spec fails
alone while its batch-mates finish.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from scheduler.core import keys, queues
from scheduler.core.keys import Stage
from scheduler.core.object_store import get_bytes, make_s3_client
from scheduler.core.settings import TransferSettings, TransformSettings
from scheduler.intake.submit import submit
from scheduler.ops.job_admin import request_cancel
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs
from tests.reference_pipeline import reference_frames
from tests.video_probe import decode_video_frames

pytestmark = [pytest.mark.slow, pytest.mark.integration]

JOB: dict[str, Any] = {
    "prompt": "a red fox running through snow",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 48,
    "frames": 9,
    "steps": 4,
    "guidance_scale": 5.0,
    "seed": 7,
    "codec": {"name": "lossless"},
}
BATCH = TransformSettings(batch_size=3, batch_wait_ms=50)
# Encode holds each output until transform pulls it: three jobs waiting for transform need three slots.
SLOTS = TransferSettings(slots=3, slot_mb=4)


def queue_for_transform(farm: Farm, specs: list[dict[str, Any]]) -> list[str]:
    """Submit ``specs`` with only encode and decode running; return once all wait in the transform queue.

    Each test has its own farm: batching settings, and no transform worker until the jobs are queued."""
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE, Stage.DECODE)
    job_ids = [submit(farm.conn, farm.settings, spec) for spec in specs]
    transform_queue = queues.stage_queue(farm.conn, Stage.TRANSFORM)
    wait_until(lambda: farm.conn.llen(transform_queue.key) == len(specs), 120, "every job encoded")
    return job_ids


def transform_log(farm: Farm) -> str:
    return (farm.settings.home / "logs" / "worker-transform.log").read_text()


def transform_span(record: dict[str, Any]) -> tuple[float, float]:
    stage = record["stages"]["transform"]
    return float(stage["started_at"]), float(stage["finished_at"])


def test_queued_compatible_jobs_run_as_one_batch_and_each_equals_wanpipeline(
    make_farm: Any, s3_config: Any, tiny_model_dir: Any
) -> None:
    farm = make_farm(transform=BATCH, transfer=SLOTS)
    specs = [
        JOB,
        {**JOB, "prompt": "a lighthouse at dusk", "seed": 8, "steps": 3, "guidance_scale": 3.0},
        {**JOB, "prompt": "rain on a window", "seed": 9},
    ]
    job_ids = queue_for_transform(farm, specs)
    farm.fleet().start(Stage.TRANSFORM)

    records = [wait_finished(farm.conn, job_id) for job_id in job_ids]

    assert [r["state"] for r in records] == ["succeeded"] * 3, worker_logs(farm.settings)
    assert "running 3 transform jobs as a batch" in transform_log(farm)
    # One worker ran all three at once: their transform spans overlap.
    spans = [transform_span(r) for r in records]
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    assert len({r["stages"]["transform"]["worker"] for r in records}) == 1
    # Each record counts its own DiT calls (one-pass guidance: one per step) and shows its own progress.
    for record, spec in zip(records, specs, strict=True):
        assert record["stages"]["transform"]["dit"]["dit_calls"] == spec["steps"]
        assert record["stages"]["transform"]["progress"] == f"{spec['steps']}/{spec['steps']}"
    # The batched job's lossless frames equal the one-process reference, as a solo job's do.
    client = make_s3_client(s3_config)
    video = get_bytes(client, s3_config.bucket, records[1]["result"]["video_key"])
    frames = decode_video_frames(video).astype(np.int16)
    reference = reference_frames(tiny_model_dir, specs[1]).astype(np.int16)
    assert frames.shape == reference.shape
    assert np.abs(frames - reference).max() <= 1


def test_a_cancelled_job_and_a_malformed_input_leave_their_batch_mates_alone(make_farm: Any) -> None:
    base = make_farm()
    farm = make_farm(
        transform=BATCH, transfer=SLOTS, worker=base.settings.worker.model_copy(update={"max_attempts": 1})
    )
    specs = [
        {**JOB, "prompt": "slowpoke fox", "steps": 8},
        {**JOB, "prompt": "a lighthouse at dusk", "seed": 8},
        # Encoded without guidance (no negative embeddings); its record is then edited to ask for guidance.
        {**JOB, "prompt": "rain on a window", "seed": 9, "guidance_scale": 1.0},
    ]
    slow, mate, malformed = queue_for_transform(farm, specs)
    spec_key = keys.job_key(malformed)
    edited = {**json.loads(farm.conn.hget(spec_key, "spec") or b"{}"), "guidance_scale": 5.0}  # type: ignore[arg-type]
    farm.conn.hset(spec_key, "spec", json.dumps(edited))
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "transform-step:0.5:slowpoke"})
    fleet.start(Stage.TRANSFORM)

    def slow_progress() -> int:
        done = (farm.conn.hget(keys.job_key(slow), "transform.progress") or b"0/8").decode()
        return int(done.split("/")[0])

    wait_until(lambda: slow_progress() >= 2, 120, "the slow job two steps in")
    assert request_cancel(farm.conn, slow)
    records = {job_id: wait_finished(farm.conn, job_id) for job_id in (slow, mate, malformed)}

    logs = worker_logs(farm.settings)
    assert "running 3 transform jobs as a batch" in transform_log(farm)
    assert records[slow]["state"] == "cancelled", logs
    assert slow_progress() < 8
    assert records[mate]["state"] == "succeeded", logs
    assert records[malformed]["state"] == "failed", logs
    assert "negative_prompt_embeds" in records[malformed]["error"]
    # The mate shared the batch with both and still ran every one of its steps.
    assert records[mate]["stages"]["transform"]["dit"]["dit_calls"] == JOB["steps"]
    assert fleet.all_alive(), "the transform worker survived both"
