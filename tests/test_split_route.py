"""A job's route as data, on a real farm: the denoising loop split over two transform hops (route issue).

With ``transform.split_at_step: 3`` a 6-step job runs ``encode -> transform@high [0,3) -> transform@low
[3,6) -> decode``: the first hop hands the latents and the scheduler's multistep state on over Mooncake,
and the frames equal the unsplit job's exactly. A transform worker killed in the second hop costs no DiT
step twice: the job resumes from the first part's saved boundary state and the second part's own save.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from scheduler.core import jobs
from scheduler.core.keys import Stage
from scheduler.core.settings import CheckpointSettings, TransformSettings
from scheduler.intake.submit import submit
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs
from tests.test_checkpoints import frames_digest

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {
    "prompt": "a red fox in snow",
    "width": 64,
    "height": 48,
    "frames": 17,
    "steps": 6,
    "codec": {"name": "lossless"},
}
SPLIT_ROUTE = ["encode", "transform@high", "transform@low", "decode"]


def split_farm(make_farm: Callable[..., Farm], **overrides: Any) -> Farm:
    # One-pass guidance off: the farm's loop is then WanPipeline's bit for bit, so any difference the split
    # made would show as a different frame hash, not hide inside the one-pass tolerance.
    return make_farm(transform=TransformSettings(split_at_step=3, one_pass_guidance=False), **overrides)


def unsplit_submit(farm: Farm, spec: dict[str, Any], job_id: str) -> str:
    """Submit as a scheduler without the split setting would: the route is fixed at submit, not by workers."""
    plain = farm.settings.model_copy(update={"transform": TransformSettings(one_pass_guidance=False)})
    return submit(farm.conn, plain, spec, job_id=job_id)


def steps_computed(record: dict[str, Any], hop: str) -> int:
    return int(record["stages"][hop].get("steps_computed", 0))


def test_split_route_hands_the_loop_state_on_and_renders_the_unsplit_frames(make_farm: Callable[..., Farm]) -> None:
    farm = split_farm(make_farm)
    fleet = farm.fleet()
    fleet.start(*Stage)
    split_id = submit(farm.conn, farm.settings, JOB)
    split = wait_finished(farm.conn, split_id, timeout=180)
    assert split["state"] == "succeeded", worker_logs(farm.settings)
    assert split["route"] == SPLIT_ROUTE
    assert split["stages"]["transform@high"]["steps"] == [0, 3]
    assert split["stages"]["transform@low"]["steps"] == [3, 6]
    assert "transform" not in split["stages"], "stages are keyed by the route's hops"
    assert (steps_computed(split, "transform@high"), steps_computed(split, "transform@low")) == (3, 3)
    assert split["stages"]["transform@low"]["progress"] == "6/6"
    # The second hop pulled the first hop's output (embeddings + latents + scheduler state) over Mooncake.
    assert int(split["stages"]["transform@low"]["input_bytes"]) > int(split["stages"]["transform@high"]["input_bytes"])

    # A job with K >= its steps, and one submitted without the setting, run the three hops.
    short = wait_finished(farm.conn, submit(farm.conn, farm.settings, {**JOB, "steps": 3}), timeout=180)
    assert short["route"] == ["encode", "transform", "decode"] and short["state"] == "succeeded"
    unsplit = wait_finished(farm.conn, unsplit_submit(farm, JOB, "unsplit"), timeout=180)
    assert unsplit["route"] == ["encode", "transform", "decode"]
    assert steps_computed(unsplit, "transform") == 6
    assert frames_digest(farm, split) == frames_digest(farm, unsplit), "lossless: the split changed no frame"


def test_killed_in_the_second_hop_the_job_completes_without_running_a_dit_step_twice(
    make_farm: Callable[..., Farm],
) -> None:
    farm = split_farm(make_farm, checkpoints=CheckpointSettings(save_every_steps=1, save_min_steps=0))
    conn = farm.conn
    # The transform worker pauses after step 5 (the second hop, its state at 5 saved), so the kill lands there.
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "transform-step-5:60"})
    fleet.start(*Stage)
    job_id = submit(conn, farm.settings, JOB)

    def low_resume_step() -> int:
        raw = jobs.job_fields(conn, job_id).get("transform@low.resume")
        return int(json.loads(raw)["step"]) if raw else 0

    wait_until(lambda: low_resume_step() == 5, 120, "the second hop's save at step 5")
    fields = jobs.job_fields(conn, job_id)
    assert json.loads(fields["transform@high.resume"])["step"] == 3, "the first hop kept its boundary state"
    fleet.sigkill(Stage.TRANSFORM)
    fleet.extra_env = {}
    fleet.start(Stage.TRANSFORM)
    record = wait_finished(conn, job_id, timeout=180)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    high, low = record["stages"]["transform@high"], record["stages"]["transform@low"]
    assert high["attempt"] == "2" and high["recovery"] == "pulled; resumed at step 3", "first part: nothing re-ran"
    assert low["recovery"] == "pulled; resumed at step 5"
    assert (steps_computed(record, "transform@high"), steps_computed(record, "transform@low")) == (3, 3)
    assert [f["stage"] for f in record["failures"]] == ["transform@low"]
    reference = wait_finished(conn, unsplit_submit(farm, JOB, "reference"), timeout=180)
    assert frames_digest(farm, record) == frames_digest(farm, reference)
