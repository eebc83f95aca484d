"""One job's DiT over several processes: diffusers' context parallelism (Ulysses) in a rank group.

On CPU the ranks are processes over gloo (`workers.dit_group` answers diffusers' device count on a
host without an accelerator); on a host with two GPUs the same test runs over nccl. Ulysses gives each
rank whole attention heads over the full sequence, so the maths per head is the single-process maths:
latents equal the single-process loop's within ``LATENT_TOLERANCE`` (measured: equal to the bit on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.dit_group import DitRankGroup
from workers.stages.encode import TextEncodeStage
from workers.stages.transform import DenoiseStage

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STAGE_TASK = "t2v"
JOB: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "seed": 5,
    "flow_shift": None,
}
LATENT_TOLERANCE = 1e-4  # as tests/test_dit_speed.py
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            torch.cuda.device_count() < 2, reason="context parallelism over nccl needs two GPUs; this host has fewer"
        ),
    ),
]


@pytest.fixture(scope="module")
def embeds(encoder: TextEncodeStage) -> dict[str, torch.Tensor]:
    return encoder.encode("a red fox running through snow", "blurry", JOB["guidance_scale"])


@pytest.fixture(params=DEVICES)
def parallel_stage(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[tuple[DenoiseStage, DitRankGroup]]:
    device = request.param
    stage = DenoiseStage(tiny_model_dir, device=device, one_pass_guidance=True)
    group = DitRankGroup(tiny_model_dir, 2, device=device, timeout_seconds=120)
    stage.rank_sender = group.start(stage.transformer)
    try:
        yield stage, group
    finally:
        group.close()


def test_two_ranks_give_the_single_process_latents(
    parallel_stage: tuple[DenoiseStage, DitRankGroup], tiny_model_dir: Path, embeds: dict[str, torch.Tensor]
) -> None:
    stage, group = parallel_stage
    single = DenoiseStage(tiny_model_dir, device=stage.device.type, one_pass_guidance=True)
    expected = single.denoise(embeds, **JOB)

    first = stage.denoise(embeds, **JOB)
    # The followers stay up across jobs: a second job on the same group.
    second = stage.denoise(embeds, **{**JOB, "seed": 6})

    assert group.healthy() and group.describe()["dit_group"] == "up"
    assert float((first - expected).abs().max()) < LATENT_TOLERANCE
    assert float((second - single.denoise(embeds, **{**JOB, "seed": 6})).abs().max()) < LATENT_TOLERANCE
    assert not torch.equal(first, second)


def test_a_job_whose_tokens_do_not_split_is_refused_and_the_group_stays_usable(
    parallel_stage: tuple[DenoiseStage, DitRankGroup], embeds: dict[str, torch.Tensor]
) -> None:
    stage, group = parallel_stage
    # One frame at 16x48: latents 1x2x6, patches of 1x2x2 -> 3 DiT tokens, which two ranks cannot share.
    with pytest.raises(ValueError, match="do not split over the worker's 2 context-parallel ranks"):
        stage.denoise(embeds, **{**JOB, "height": 16, "width": 48, "num_frames": 1})
    assert group.healthy()
    assert stage.denoise(embeds, **{**JOB, "num_inference_steps": 1}).shape[0] == 1


def test_a_rank_count_that_does_not_divide_the_heads_is_refused_before_any_process_starts(
    tiny_model_dir: Path,
) -> None:
    stage = DenoiseStage(tiny_model_dir)
    group = DitRankGroup(tiny_model_dir, 3)
    with pytest.raises(ValueError, match="must divide the DiT's 2 attention heads"):
        group.start(stage.transformer)
    assert group.children == []
    assert torch.accelerator.device_count() == torch.cuda.device_count()  # nothing patched was left behind


def test_a_context_parallel_transform_worker_renders_the_wanpipeline_frames(
    make_farm: Any, s3_config: Any, tiny_model_dir: Path
) -> None:
    from scheduler.core.keys import Stage
    from scheduler.core.object_store import get_bytes, make_s3_client
    from scheduler.core.settings import TransformSettings
    from scheduler.core.worker_registry import live_workers
    from scheduler.intake.submit import submit
    from tests.farm_harness import wait_finished, worker_logs
    from tests.reference_pipeline import reference_frames
    from tests.video_probe import decode_video_frames

    # Own farm: its transform worker runs a two-rank context-parallel group.
    farm = make_farm(transform=TransformSettings(context_parallel=2))
    farm.fleet().start(*Stage)
    spec = {
        "prompt": "a red fox running through snow",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 48,
        "frames": 9,
        "steps": 3,
        "seed": 11,
        "codec": {"name": "lossless"},
    }

    record = wait_finished(farm.conn, submit(farm.conn, farm.settings, spec))

    assert record["state"] == "succeeded", worker_logs(farm.settings)
    transform = next(w for w in live_workers(farm.conn) if w["stage"] == "transform")
    assert transform["dit_ranks"] == "2" and transform["dit_group"] == "up"
    assert len(transform["dit_rank_pids"].split(",")) == 1  # rank 0 is the worker itself
    video = get_bytes(make_s3_client(s3_config), s3_config.bucket, record["result"]["video_key"])
    frames = decode_video_frames(video).astype("int16")
    reference = reference_frames(tiny_model_dir, {**spec, "guidance_scale": 5.0}).astype("int16")
    assert abs(frames - reference).max() <= 1
