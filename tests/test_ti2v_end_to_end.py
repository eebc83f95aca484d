"""Wan2.2-TI2V on a real farm (Valkey, Mooncake, S3, ffmpeg): t2v and i2v jobs equal diffusers' pipelines.

One fleet serves ``tiny-ti2v`` (the default, t2v) and ``tiny-ti2v-i2v`` (``i2v``); the videos' frames are
compared with WanPipeline / WanImageToVideoPipeline on the same directories and seeds, within one uint8
level as tests/test_i2v_end_to_end.py allows: the farm runs its default one-pass guidance (cond and uncond
as one batch-of-2 DiT call, whose kernels round differently from the pipelines' two calls; the stage tests
in tests/test_ti2v_stages.py, with it off, match exactly), and the video is lossless RGB H.264.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from scheduler.core.image_checks import load_and_check_image
from scheduler.core.keys import Stage
from scheduler.core.object_store import get_bytes, make_s3_client
from scheduler.core.spec import SpecError
from scheduler.intake.submit import submit
from tests.farm_harness import WorkerFleet, farm_settings, wait_finished, worker_logs
from tests.reference_pipeline import reference_frames
from tests.test_i2v_end_to_end import gradient_png
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {
    "prompt": "the fox turns its head",
    "negative_prompt": "blurry",
    "width": 96,  # multiples of 32: 16x VAE x 2x2 patches
    "height": 64,
    "frames": 17,
    "steps": 4,
    "guidance_scale": 5.0,
    "seed": 7,
    "codec": {"name": "lossless"},
}


def test_ti2v_t2v_and_i2v_jobs_match_the_pipelines(
    redis_url: str, s3_config: Any, tiny_ti2v_model_dir: Path, tiny_ti2v_i2v_model_dir: Path, tmp_path: Path
) -> None:
    settings = farm_settings(redis_url, s3_config, tiny_ti2v_model_dir, tmp_path, models={"i2v": tiny_ti2v_i2v_model_dir})
    conn = redis.Redis.from_url(redis_url)
    image_path = gradient_png(tmp_path / "fox.png", size=(120, 80))
    # Refused at submit, before any worker: 48 is on Wan2.1's 16-pixel grid, not on TI2V's 32.
    with pytest.raises(SpecError, match=r"height: model 'default' needs width and height in multiples of 32"):
        submit(conn, settings, {**JOB, "height": 48})
    fleet = WorkerFleet(settings)
    try:
        fleet.start(*Stage)
        t2v = submit(conn, settings, JOB)
        i2v = submit(conn, settings, {**JOB, "image": str(image_path)})
        records = [wait_finished(conn, job, timeout=300) for job in (t2v, i2v)]
        assert [r["state"] for r in records] == ["succeeded", "succeeded"], worker_logs(settings)
    finally:
        fleet.stop_all()
    assert [r["spec"]["model"] for r in records] == ["default", "i2v"]

    client = make_s3_client(s3_config)
    videos = [decode_video_frames(get_bytes(client, s3_config.bucket, r["result"]["video_key"])) for r in records]
    image = load_and_check_image(image_path.read_bytes(), max_bytes=1 << 24, max_pixels=1 << 24)
    expected = [reference_frames(tiny_ti2v_model_dir, JOB), reference_frames(tiny_ti2v_i2v_model_dir, JOB, image)]
    for frames, reference in zip(videos, expected, strict=True):
        assert frames.shape == reference.shape == (17, 64, 96, 3)
        assert np.abs(frames.astype(np.int16) - reference.astype(np.int16)).max() <= 1
