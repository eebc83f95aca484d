"""Resumable denoising: a loop saved at a step boundary, written to the checkpoint format and read back,
continues to exactly the latents of an uninterrupted run; bad checkpoints are refused before use."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scheduler.core.spec import JobSpec
from workers.checkpoints import CheckpointUnusable, parse, serialize, state_from_parsed, state_metadata
from workers.stages.denoise_state import DenoiseState
from workers.stages.transform import DenoiseStage
from workers.transfer.packing import bytes_checksum

STAGE_TASK = "t2v"
JOB: dict[str, Any] = {"height": 48, "width": 64, "num_frames": 17, "num_inference_steps": 8, "guidance_scale": 5.0}
SPEC = JobSpec(prompt="a red fox", height=48, width=64, frames=17, steps=8, seed=3)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def embeds(encoder: Any) -> dict[str, torch.Tensor]:
    embeddings: dict[str, torch.Tensor] = encoder.encode("a red fox", "blurry", 5.0)
    return embeddings


def run(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return denoiser.denoise(embeds, seed=3, flow_shift=None, **JOB, **kwargs)


def saved_at(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor], step: int) -> DenoiseState:
    """Run until ``step``, capture the state there and stop (as a killed worker would, after its save)."""
    captured: list[DenoiseState] = []

    def at_boundary(done: int, total: int, capture: Any) -> None:
        if done == step:
            captured.append(capture())
            raise Stop

    with pytest.raises(Stop):
        run(denoiser, embeds, at_boundary=at_boundary)
    return captured[0]


def round_trip(state: DenoiseState) -> DenoiseState:
    data = serialize(state.tensors, state_metadata(state))
    return state_from_parsed(*parse(data, bytes_checksum(data)), SPEC)


@pytest.mark.parametrize("step", [1, 2, 6, 7])
def test_resumed_loop_ends_at_the_uninterrupted_latents(
    denoiser: DenoiseStage, embeds: dict[str, torch.Tensor], step: int
) -> None:
    uninterrupted = run(denoiser, embeds)
    state = round_trip(saved_at(denoiser, embeds, step))
    # UniPC's multistep memory travels with the latents.
    assert state.step == step and any(name.startswith("scheduler.model_outputs.") for name in state.tensors)
    computed: list[int] = []
    resumed = run(denoiser, embeds, resume=state, on_step=lambda done, total: computed.append(done))
    assert computed == list(range(step + 1, 9)), "only the steps after the save are computed"
    assert torch.equal(resumed, uninterrupted)


def test_resuming_without_the_scheduler_memory_would_differ(
    denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]
) -> None:
    """The scheduler state matters: latents alone (a fresh UniPC) do not continue the same trajectory."""
    state = saved_at(denoiser, embeds, 6)
    latents_only = DenoiseState(6, 8, {"latents": state.latents}, {"_step_index": {"value": 6}})
    assert not torch.equal(run(denoiser, embeds, resume=latents_only), run(denoiser, embeds))


def test_damaged_or_foreign_checkpoints_are_refused(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> None:
    state = saved_at(denoiser, embeds, 2)
    data = serialize(state.tensors, state_metadata(state))
    checksum = bytes_checksum(data)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    with pytest.raises(CheckpointUnusable, match="checksum"):
        parse(bytes(flipped), checksum)
    garbage = b"\xff" * 64
    with pytest.raises(CheckpointUnusable, match="not a reelfarm checkpoint"):
        parse(garbage, bytes_checksum(garbage))
    with pytest.raises(CheckpointUnusable, match="needs float32"):
        state_from_parsed(*parse(data, checksum), SPEC.model_copy(update={"width": 32}))
    with pytest.raises(CheckpointUnusable, match="step 2 of 8"):
        state_from_parsed(*parse(data, checksum), SPEC.model_copy(update={"steps": 10}))
    bad_scheduler = DenoiseState(2, 8, state.tensors, {"betas": {"value": 1}})
    with pytest.raises(ValueError, match="does not keep"):
        run(denoiser, embeds, resume=bad_scheduler)
