"""Image-to-video on a real farm (issue 5): exact match with WanImageToVideoPipeline, model routing, bad images."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from scheduler.core import jobs
from scheduler.core.image_checks import load_and_check_image
from scheduler.core.keys import Stage
from scheduler.core.object_store import get_bytes, make_s3_client, put_bytes
from scheduler.core.queues import queue_depths
from scheduler.core.spec import SpecError, SpecLimits
from scheduler.core.worker_registry import live_workers
from scheduler.intake.submit import submit
from tests.farm_harness import WorkerFleet, farm_settings, wait_finished, worker_logs
from tests.reference_pipeline import reference_frames
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow

I2V_JOB: dict[str, Any] = {
    "prompt": "the fox turns its head",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 48,
    "frames": 17,
    "steps": 4,
    "guidance_scale": 5.0,
    "seed": 7,
    "codec": {"name": "lossless"},
}


def gradient_png(path: Path, size: tuple[int, int] = (80, 60)) -> Path:
    x = np.linspace(0, 255, size[0], dtype=np.float32)
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (size[1], size[0])), np.broadcast_to(y, (size[1], size[0])), (x + y) / 2], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def two_model_settings(redis_url: str, s3_config: Any, t2v: Path, i2v: Path, home: Path) -> Any:
    return farm_settings(redis_url, s3_config, t2v, home, models={"i2v": i2v})


def test_i2v_matches_pipeline_and_routes_by_model(
    redis_url: str, s3_config: Any, tiny_model_dir: Path, tiny_i2v_model_dir: Path, tmp_path: Path
) -> None:
    settings = two_model_settings(redis_url, s3_config, tiny_model_dir, tiny_i2v_model_dir, tmp_path)
    conn = redis.Redis.from_url(redis_url)
    # Own farm: the i2v jobs must wait while no worker serves their model, and each stage's worker is checked.
    image_path = gradient_png(tmp_path / "fox.png")
    t2v_fleet = WorkerFleet(settings, extra_env={"REELFARM_WORKER_MODELS": "default"})
    i2v_fleet = WorkerFleet(settings, extra_env={"REELFARM_WORKER_MODELS": "i2v"})
    try:
        t2v_fleet.start(*Stage)
        # A mixed batch; the image jobs wait while no worker serves their model, and status says so.
        mixed = [
            submit(conn, settings, {**I2V_JOB, "image": str(image_path)}),
            submit(conn, settings, {"prompt": "a fox", "width": 64, "height": 48, "frames": 17, "steps": 2}),
            submit(conn, settings, {**I2V_JOB, "image": str(image_path), "seed": 8, "codec": {"name": "h264"}}),
            submit(conn, settings, {"prompt": "a hare", "width": 64, "height": 48, "frames": 17, "steps": 2}),
        ]
        assert wait_finished(conn, mixed[1])["state"] == "succeeded", worker_logs(settings)
        waiting = jobs.read_status(conn, mixed[0])
        assert waiting["state"] == "queued"
        assert "no live encode worker serves model 'i2v'" in waiting["note"]
        i2v_fleet.start(*Stage)
        records = [wait_finished(conn, j, timeout=180) for j in mixed]
        assert [r["state"] for r in records] == ["succeeded"] * 4, worker_logs(settings)
        by_model = {w["worker_id"]: w["models"] for w in live_workers(conn)}
        for record in records:
            model = record["spec"]["model"]
            assert model == ("i2v" if record["spec"]["image"] else "default")
            for stage in record["stages"].values():
                assert by_model[stage["worker"]] == model, "each stage ran on a worker of the job's model"
    finally:
        t2v_fleet.stop_all()
        i2v_fleet.stop_all()

    client = make_s3_client(s3_config)
    result = records[0]["result"]
    frames = decode_video_frames(get_bytes(client, s3_config.bucket, result["video_key"]))
    assert frames.shape == (17, 48, 64, 3)
    image = load_and_check_image(image_path.read_bytes(), max_bytes=1 << 24, max_pixels=1 << 24)
    reference = reference_frames(tiny_i2v_model_dir, I2V_JOB, image)
    assert np.abs(frames.astype(np.int16) - reference.astype(np.int16)).max() <= 1
    # The image really conditions the video: another image gives other frames.
    other = reference_frames(tiny_i2v_model_dir, I2V_JOB, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert not np.array_equal(other, reference)


def test_bad_images_are_refused_at_submit(
    redis_url: str, s3_config: Any, tiny_model_dir: Path, tiny_i2v_model_dir: Path, tmp_path: Path
) -> None:
    settings = two_model_settings(redis_url, s3_config, tiny_model_dir, tiny_i2v_model_dir, tmp_path)
    settings = settings.model_copy(update={"limits": SpecLimits(max_image_bytes=200_000, max_image_pixels=300 * 300)})
    conn = redis.Redis.from_url(redis_url)
    good = gradient_png(tmp_path / "good.png")
    (tmp_path / "not-image.png").write_text("hello, I am text")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    gradient_png(tmp_path / "huge.png", size=(400, 400))
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    (tmp_path / "heavy.png").write_bytes(buffer.getvalue())
    put_bytes(make_s3_client(s3_config), s3_config.bucket, "uploads/text.png", b"plain text", "text/plain")
    cases = {
        str(tmp_path / "not-image.png"): "not an image",
        str(tmp_path / "truncated.png"): "truncated",
        str(tmp_path / "huge.png"): "pixels",
        str(tmp_path / "heavy.png"): "bytes",
        str(tmp_path / "missing.png"): "does not exist",
        "ftp://example.org/fox.png": "ftp",
        f"s3://{s3_config.bucket}/uploads/nope.png": "cannot read image",
        f"s3://{s3_config.bucket}/uploads/text.png": "not an image",
    }
    for source, fragment in cases.items():
        with pytest.raises(SpecError) as err:
            submit(conn, settings, {**I2V_JOB, "image": source})
        assert fragment in str(err.value), (source, str(err.value))
        assert "\n" not in str(err.value)
    assert list(conn.scan_iter("reelfarm:job:*")) == []
    assert sum(queue_depths(conn, ["default", "i2v"]).values()) == 0
    with pytest.raises(SpecError, match="needs an image"):
        submit(conn, settings, {"prompt": "x", "model": "i2v"})
    with pytest.raises(SpecError, match="not served by this farm"):
        submit(conn, settings, {"prompt": "x", "model": "nope"})
