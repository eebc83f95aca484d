"""Wan2.2-A14B's experts on the farm: one transform worker per expert (``--expert high|low``), the boundary
hand-off over Mooncake, and the frames of one-process diffusers; placed together on one worker too.

Real Valkey, Mooncake (TCP on loopback), SeaweedFS and ffmpeg, the tiny two-expert model, lossless video,
one-pass guidance off: the farm's frames then equal WanPipeline's exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scheduler.core import jobs
from scheduler.core.keys import Hop, Stage
from scheduler.core.model_options import ModelOptions
from scheduler.core.object_store import S3Config, get_bytes, make_s3_client
from scheduler.core.settings import CheckpointSettings, TransformSettings
from scheduler.core.spec import JobSpec
from scheduler.intake.submit import submit
from scheduler.ops.job_admin import cancel_job, worker_rows
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs
from tests.reference_pipeline import reference_frames
from tests.test_checkpoints import frames_digest
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {
    "prompt": "a red fox in snow",
    "width": 64,
    "height": 64,
    "frames": 9,
    "steps": 6,
    "guidance_scale": 5.0,
    "guidance_scale_2": 2.0,
    "codec": {"name": "lossless"},
}
# What the reference pipeline is given: the spec as submitted, defaults filled in (seed, negative prompt).
FULL_JOB = JobSpec.model_validate(JOB).model_dump()
EXPERT_ROUTE = ["encode", "transform@high", "transform@low", "decode"]
HIGH, LOW = Hop("transform@high"), Hop("transform@low")


def expert_farm(make_farm: Callable[..., Farm], model_dir: Path, **overrides: Any) -> Farm:
    return make_farm(model_dir=model_dir, transform=TransformSettings(one_pass_guidance=False), **overrides)


def steps_computed(record: dict[str, Any], hop: str) -> int:
    return int(record["stages"][hop].get("steps_computed", 0))


def video_frames(farm: Farm, record: dict[str, Any]) -> np.ndarray:
    s3 = farm.settings.s3
    client = make_s3_client(S3Config(s3.endpoint_url, s3.bucket, s3.access_key, s3.secret_key))
    return decode_video_frames(get_bytes(client, farm.settings.s3.bucket, record["result"]["video_key"]))


def test_experts_on_their_own_workers_and_together_render_wanpipelines_frames(
    make_farm: Callable[..., Farm], tiny_two_expert_model_dir: Path
) -> None:
    farm = expert_farm(make_farm, tiny_two_expert_model_dir)
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE, Stage.DECODE)
    fleet.start_expert("high")
    fleet.start_expert("low")
    split = wait_finished(farm.conn, submit(farm.conn, farm.settings, JOB), timeout=240)
    assert split["state"] == "succeeded", worker_logs(farm.settings)
    assert split["route"] == EXPERT_ROUTE
    high, low = split["stages"]["transform@high"], split["stages"]["transform@low"]
    # The boundary (t >= 875 at shift 3) falls after step 2 of 6; each expert ran on its own worker.
    assert (steps_computed(split, "transform@high"), steps_computed(split, "transform@low")) == (2, 4)
    assert high["worker"] != low["worker"]
    # `reelfarm info` names each expert worker's hop.
    assert {row.stage for row in worker_rows(farm.conn)} == {"encode", "transform@high", "transform@low", "decode"}
    assert (high["dit"]["experts"], high["dit"]["steps"]) == ("high", "0,2")
    assert (low["dit"]["experts"], low["dit"]["steps"]) == ("low", "2,6")
    # The low-noise hop pulled the latents and the scheduler state beside the embeddings, over Mooncake.
    assert int(low["input_bytes"]) > int(high["input_bytes"])
    expected = reference_frames(tiny_two_expert_model_dir, FULL_JOB)
    assert np.array_equal(video_frames(farm, split), expected), "lossless: the split frames are WanPipeline's"

    # Experts together: one worker holds both and switches at the boundary; the same frames.
    fleet.start(Stage.TRANSFORM)
    together_settings = farm.settings.model_copy(
        update={"model_options": {"default": ModelOptions(experts="together")}}
    )
    together = wait_finished(farm.conn, submit(farm.conn, together_settings, JOB), timeout=240)
    assert together["state"] == "succeeded", worker_logs(farm.settings)
    assert together["route"] == ["encode", "transform", "decode"]
    assert together["stages"]["transform"]["dit"]["experts"] == "high,low"
    assert steps_computed(together, "transform") == 6
    assert frames_digest(farm, together) == frames_digest(farm, split)
    # guidance_scale_2 changes only the low-noise steps, and it changes them.
    same_guidance = {**JOB, "guidance_scale_2": None}
    plain = wait_finished(farm.conn, submit(farm.conn, farm.settings, same_guidance), timeout=240)
    expected_plain = reference_frames(tiny_two_expert_model_dir, {**FULL_JOB, "guidance_scale_2": None})
    assert np.array_equal(video_frames(farm, plain), expected_plain)
    assert frames_digest(farm, plain) != frames_digest(farm, split)


def test_killed_low_noise_worker_resumes_without_rerunning_a_high_noise_step(
    make_farm: Callable[..., Farm], tiny_two_expert_model_dir: Path
) -> None:
    farm = expert_farm(
        make_farm, tiny_two_expert_model_dir, checkpoints=CheckpointSettings(save_every_steps=1, save_min_steps=0)
    )
    conn = farm.conn
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE, Stage.DECODE)
    fleet.start_expert("high")
    # The low-noise worker pauses after step 4 (its state at 4 saved), so the kill lands mid-hop.
    slow = farm.fleet({"REELFARM_FAULT_SLOW": "transform-step-4:60"})
    slow.start_expert("low")
    job_id = submit(conn, farm.settings, JOB)

    def low_resume_step() -> int:
        raw = jobs.job_fields(conn, job_id).get("transform@low.resume")
        return int(json.loads(raw)["step"]) if raw else 0

    wait_until(lambda: low_resume_step() == 4, 180, "the low-noise hop's save at step 4")
    slow.sigkill(LOW)
    fleet.start_expert("low")
    record = wait_finished(conn, job_id, timeout=240)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    high, low = record["stages"]["transform@high"], record["stages"]["transform@low"]
    # The low hop's retry needs its input again: the high hop's new attempt is its boundary save, no step run.
    assert high["attempt"] == "2" and high["recovery"] == "pulled; resumed at step 2", "no high-noise step re-ran"
    assert low["recovery"] == "pulled; resumed at step 4"
    assert (steps_computed(record, "transform@high"), steps_computed(record, "transform@low")) == (2, 4)
    assert [f["stage"] for f in record["failures"]] == ["transform@low"]
    assert np.array_equal(video_frames(farm, record), reference_frames(tiny_two_expert_model_dir, FULL_JOB))


def test_cancel_during_the_high_noise_hop_stops_both_hops(
    make_farm: Callable[..., Farm], tiny_two_expert_model_dir: Path
) -> None:
    farm = expert_farm(make_farm, tiny_two_expert_model_dir)
    conn = farm.conn
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "transform-step-1:3"})
    fleet.start(Stage.ENCODE, Stage.DECODE)
    fleet.start_expert("high")
    fleet.start_expert("low")
    job_id = submit(conn, farm.settings, JOB)
    wait_until(lambda: jobs.job_fields(conn, job_id).get("transform@high.progress") == "1/6", 120, "step 1")
    cancel_job(conn, job_id)
    record = wait_finished(conn, job_id, timeout=120)
    assert record["state"] == "cancelled", worker_logs(farm.settings)
    assert steps_computed(record, "transform@high") == 1
    assert record["stages"].get("transform@low", {}).get("state") in (None, "pending"), record["stages"]
    assert "result" not in record or not record["result"]


def test_two_expert_image_to_video_split_renders_wan_image_to_video_pipelines_frames(
    make_farm: Callable[..., Farm], tiny_two_expert_i2v_model_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from scheduler.core.image_checks import load_and_check_image
    from tests.test_i2v_stages import noise_image

    image_path = tmp_path / "first-frame.png"
    noise_image(5).save(image_path)
    farm = expert_farm(make_farm, tiny_two_expert_i2v_model_dir)
    fleet = farm.fleet()
    fleet.start(Stage.ENCODE, Stage.DECODE)
    fleet.start_expert("high")
    fleet.start_expert("low")
    spec = {**JOB, "image": str(image_path), "guidance_scale_2": 3.0}
    record = wait_finished(farm.conn, submit(farm.conn, farm.settings, spec), timeout=240)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    assert record["route"] == EXPERT_ROUTE
    assert record["stages"]["transform@high"]["worker"] != record["stages"]["transform@low"]["worker"]
    image = load_and_check_image(image_path.read_bytes(), max_bytes=1 << 24, max_pixels=1 << 24)
    full = {**FULL_JOB, "guidance_scale_2": 3.0}
    expected = reference_frames(tiny_two_expert_i2v_model_dir, full, image)
    assert np.array_equal(video_frames(farm, record), expected), "lossless: WanImageToVideoPipeline's frames"
    flipped = reference_frames(tiny_two_expert_i2v_model_dir, full, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert not np.array_equal(flipped, expected), "the image conditions the video"
