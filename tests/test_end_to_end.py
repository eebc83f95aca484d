"""Text-to-video end to end on real parts: Valkey, three worker processes, Mooncake TCP, SeaweedFS, ffmpeg.

The farm's lossless frames must equal what diffusers' WanPipeline produces in one
process from the same model dir, prompt and seed: that checks encode, the
hand-offs, the denoising loop, streaming decode and the video path together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from scheduler.core.object_store import get_bytes, list_incomplete_uploads, make_s3_client
from scheduler.core.worker_registry import live_workers
from scheduler.intake.submit import submit
from tests.farm_harness import farm_settings, running_workers, wait_finished, worker_logs
from tests.reference_pipeline import reference_frames
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow

PROMPT = "a red fox running through snow"
NEGATIVE = "blurry, low quality"
SPEC: dict[str, Any] = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "width": 64,
    "height": 48,
    "frames": 17,
    "steps": 4,
    "guidance_scale": 5.0,
    "seed": 1234,
    "codec": {"name": "lossless"},
}
# Any single key above this would mean tensor bytes went through Redis (the tiny
# model's prompt embeddings alone are 512 x 32 fp32 = 64 KiB).
MAX_REDIS_VALUE_BYTES = 16 * 1024


def test_two_jobs_end_to_end_match_wanpipeline(
    redis_url: str, s3_config: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = farm_settings(redis_url, s3_config, tiny_model_dir, tmp_path)
    conn = redis.Redis.from_url(redis_url)
    # Own farm: the test counts what each worker did (one model load, exactly these two jobs).
    with running_workers(settings):
        first = submit(conn, settings, SPEC)
        # The second job also asks for step caching: the transform worker applies it for that job only.
        second = submit(
            conn,
            settings,
            {
                **SPEC,
                "seed": 99,
                "codec": {"name": "h264", "crf": 20},
                "cache": {"method": "first_block", "threshold": 0.5},
            },
        )
        records = [wait_finished(conn, first), wait_finished(conn, second)]
        workers = live_workers(conn)

    assert [r["state"] for r in records] == ["succeeded", "succeeded"], worker_logs(settings)
    client = make_s3_client(s3_config)
    frames = {}
    for record in records:
        result = record["result"]
        video = get_bytes(client, s3_config.bucket, result["video_key"])
        decoded = decode_video_frames(video)
        assert decoded.shape == (17, 48, 64, 3)
        frames[record["job_id"]] = decoded
        stem = result["video_key"].rsplit("/", 1)[0]
        poster = get_bytes(client, s3_config.bucket, f"{stem}/poster.jpg")
        assert poster[:2] == b"\xff\xd8", "poster is a JPEG"
        metadata = json.loads(get_bytes(client, s3_config.bucket, f"{stem}/metadata.json"))
        assert metadata["job_id"] == record["job_id"]
        assert metadata["result"]["sha256"] == result["sha256"]
        assert set(metadata["timings_seconds"]) == {"encode", "transform", "decode"}
        assert record["stages"]["transform"]["progress"] == "4/4"
    assert list_incomplete_uploads(client, s3_config.bucket, "") == []
    # How the DiT ran is on the record: the farm default (one-pass guidance: one DiT call per step),
    # and for the cached job the calls its cache skipped -- the first job's run was left uncached.
    dit = [record["stages"]["transform"]["dit"] for record in records]
    assert dit[0] == {
        "one_pass_guidance": True,
        "compiled": False,
        "attention_backend": "default",
        "quantize": "none",
        "dit_calls": 4,
        "dit_calls_skipped": 0,
    }
    assert dit[1]["dit_calls"] == 4 and dit[1]["dit_calls_skipped"] > 0

    # Lossless output equals the one-process reference.
    reference = reference_frames(tiny_model_dir, SPEC)
    farm = frames[first].astype(np.int16)
    assert np.abs(farm - reference.astype(np.int16)).max() <= 1
    # A different seed gives a different video, so the comparison above could fail.
    assert not np.array_equal(frames[first], frames[second])

    # Each worker loaded its model once and served both jobs.
    by_stage = {w["stage"]: w for w in workers}
    assert set(by_stage) == {"encode", "transform", "decode"}
    for worker in by_stage.values():
        assert worker["model_loads"] == "1"
        assert worker["jobs_done"] == "2"
        assert worker["receive"] == "private"  # TCP: payloads land straight in the consumer's tensors
    for record in records:
        assert {s: record["stages"][s]["worker"] for s in by_stage} == {s: by_stage[s]["worker_id"] for s in by_stage}

    # No tensor payload ever sat in Redis.
    sizes = {key: conn.memory_usage(key) or 0 for key in conn.scan_iter(count=1000)}
    assert sizes, "expected farm keys in Redis"
    biggest = max(sizes, key=lambda k: sizes[k])
    assert sizes[biggest] < MAX_REDIS_VALUE_BYTES, f"{biggest!r} holds {sizes[biggest]} bytes"


def test_registered_slot_receive_path_matches_wanpipeline(
    redis_url: str, s3_config: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The receive path RDMA needs (registered slot, copy out, verify the copies), forced on TCP."""
    settings = farm_settings(redis_url, s3_config, tiny_model_dir, tmp_path)
    settings = settings.model_copy(update={"transfer": settings.transfer.model_copy(update={"direct_receive": False})})
    conn = redis.Redis.from_url(redis_url)
    # Own farm: every worker must run with direct_receive off.
    with running_workers(settings):
        record = wait_finished(conn, submit(conn, settings, SPEC))
        receive = {w["stage"]: w["receive"] for w in live_workers(conn)}
    assert record["state"] == "succeeded", worker_logs(settings)
    assert receive == {"encode": "slot", "transform": "slot", "decode": "slot"}
    video = get_bytes(make_s3_client(s3_config), s3_config.bucket, record["result"]["video_key"])
    farm = decode_video_frames(video).astype(np.int16)
    assert np.abs(farm - reference_frames(tiny_model_dir, SPEC).astype(np.int16)).max() <= 1
