"""The transform stage's speed options against the plain loop (and so against WanPipeline).

One-pass guidance and the attention backends change floating-point rounding only: latents
equal the two-pass loop's within ``LATENT_TOLERANCE`` and decoded frames equal WanPipeline's within
1/255 (the farm's end-to-end tolerance). Step caching changes the result by design: the tests check
that it skips DiT calls, counts them, and leaves the resident transformer uncached afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scheduler.core.spec import CacheOptions
from workers.stages import StageCancelled, dit_speed
from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
from workers.stages.encode import TextEncodeStage
from workers.stages.transform import DenoiseStage

STAGE_TASK = "t2v"
PROMPT, NEGATIVE = "a red fox running through snow", "blurry"
JOB: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 17,
    "num_inference_steps": 6,
    "guidance_scale": 5.0,
    "seed": 42,
    "flow_shift": None,
}
# Latents are O(1) (max |x| ~ 5 here); batching cond+uncond moves them by ~4e-6 on CPU float32.
LATENT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def embeds(encoder: TextEncodeStage) -> dict[str, torch.Tensor]:
    return encoder.encode(PROMPT, NEGATIVE, JOB["guidance_scale"])


@pytest.fixture(scope="module")
def two_pass(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    assert not denoiser.one_pass_guidance
    return denoiser.denoise(embeds, **JOB)


@pytest.fixture(scope="module")
def one_pass_stage(tiny_model_dir: Path) -> DenoiseStage:
    return DenoiseStage(tiny_model_dir, one_pass_guidance=True)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_one_pass_guidance_equals_two_passes_within_tolerance(
    one_pass_stage: DenoiseStage, embeds: dict[str, torch.Tensor], two_pass: torch.Tensor
) -> None:
    one_pass = one_pass_stage.denoise(embeds, **JOB)

    assert one_pass.shape == two_pass.shape
    assert max_difference(one_pass, two_pass) <= LATENT_TOLERANCE
    # Not the same computation: had the setting been ignored, this would be bit-equal.
    assert not torch.equal(one_pass, two_pass)


def test_one_pass_frames_equal_wanpipeline_frames(
    one_pass_stage: DenoiseStage, embeds: dict[str, torch.Tensor], decoder: StreamingVaeDecoder, pipeline: Any
) -> None:
    latents = one_pass_stage.denoise(embeds, **{**JOB, "num_inference_steps": 4})
    frames = np.concatenate(list(decoder.iter_frames(latents)))
    expected = pipeline(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=JOB["height"],
        width=JOB["width"],
        num_frames=JOB["num_frames"],
        num_inference_steps=4,
        guidance_scale=JOB["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        output_type="np",
    ).frames[0]

    assert np.abs(frames.astype(np.int16) - frames_to_uint8(expected).astype(np.int16)).max() <= 1


def test_one_pass_without_guidance_is_the_plain_single_call(
    one_pass_stage: DenoiseStage, denoiser: DenoiseStage, encoder: TextEncodeStage
) -> None:
    embeds = encoder.encode(PROMPT, NEGATIVE, 1.0)
    job = {**JOB, "guidance_scale": 1.0, "num_inference_steps": 2}
    with dit_speed.step_cache(one_pass_stage.transformer, None) as calls:
        ours = one_pass_stage.denoise(embeds, **job)

    assert calls.calls == 2
    assert torch.equal(ours, denoiser.denoise(embeds, **job))


@pytest.mark.parametrize(("one_pass", "calls_per_step"), [(False, 2), (True, 1)])
def test_uncached_run_counts_every_dit_call_and_skips_none(
    denoiser: DenoiseStage,
    one_pass_stage: DenoiseStage,
    embeds: dict[str, torch.Tensor],
    one_pass: bool,
    calls_per_step: int,
) -> None:
    stage = one_pass_stage if one_pass else denoiser
    with dit_speed.step_cache(stage.transformer, None) as calls:
        stage.denoise(embeds, **JOB)

    assert calls.as_record() == {"dit_calls": JOB["num_inference_steps"] * calls_per_step, "dit_calls_skipped": 0}


@pytest.mark.parametrize("stage_name", ["two_pass_stage", "one_pass_stage"])
def test_first_block_cache_skips_calls_and_is_removed_after_the_job(
    request: pytest.FixtureRequest,
    denoiser: DenoiseStage,
    embeds: dict[str, torch.Tensor],
    two_pass: torch.Tensor,
    stage_name: str,
) -> None:
    stage: DenoiseStage = denoiser if stage_name == "two_pass_stage" else request.getfixturevalue(stage_name)
    uncached = stage.denoise(embeds, **JOB)

    with dit_speed.step_cache(stage.transformer, CacheOptions(method="first_block", threshold=0.3)) as calls:
        assert stage.transformer.is_cache_enabled
        cached = stage.denoise(embeds, **JOB)

    assert calls.skipped > 0
    assert calls.full + calls.skipped == calls.calls
    assert not torch.equal(cached, uncached)
    # The resident DiT serves the next job exactly as before: hooks gone, no state carried over.
    assert not stage.transformer.is_cache_enabled
    assert torch.equal(stage.denoise(embeds, **JOB), uncached)
    assert max_difference(uncached, two_pass) <= LATENT_TOLERANCE


def test_a_higher_threshold_skips_more(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> None:
    skipped = []
    for threshold in (0.01, 0.3):
        with dit_speed.step_cache(denoiser.transformer, CacheOptions(method="first_block", threshold=threshold)) as c:
            denoiser.denoise(embeds, **JOB)
        skipped.append(c.skipped)

    assert skipped[0] < skipped[1]


def test_cache_is_removed_when_the_job_stops_midway(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> None:
    steps: list[int] = []
    with pytest.raises(StageCancelled):
        with dit_speed.step_cache(denoiser.transformer, CacheOptions(method="first_block", threshold=0.3)):
            denoiser.denoise(embeds, on_step=lambda i, n: steps.append(i), should_stop=lambda: len(steps) == 2, **JOB)

    assert not denoiser.transformer.is_cache_enabled


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_attention_backends_give_equal_latents(
    tiny_model_dir: Path, embeds: dict[str, torch.Tensor], two_pass: torch.Tensor, backend: str
) -> None:
    stage = DenoiseStage(tiny_model_dir, attention_backend=backend)

    assert stage.speed_options()["attention_backend"] == backend
    assert max_difference(stage.denoise(embeds, **JOB), two_pass) <= LATENT_TOLERANCE


def test_unknown_attention_backend_is_refused_in_one_line(tiny_model_dir: Path) -> None:
    with pytest.raises(dit_speed.SpeedOptionError, match="not a diffusers attention backend; use one of") as err:
        DenoiseStage(tiny_model_dir, attention_backend="warp-speed")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_compiled_blocks_give_equal_latents_and_compile_once_not_per_job(
    tiny_model_dir: Path, embeds: dict[str, torch.Tensor], two_pass: torch.Tensor
) -> None:
    from torch._dynamo.utils import counters

    stage = DenoiseStage(tiny_model_dir, compile_blocks=True)
    first = stage.denoise(embeds, **JOB)  # compiles the block for this shape (tens of seconds on a CPU)
    graphs_after_first_job = counters["stats"]["unique_graphs"]
    with dit_speed.step_cache(stage.transformer, None) as calls:
        again = stage.denoise(embeds, **{**JOB, "seed": 7})

    assert graphs_after_first_job >= 1
    assert counters["stats"]["unique_graphs"] == graphs_after_first_job, "a second job of the same shape recompiled"
    assert max_difference(first, two_pass) <= LATENT_TOLERANCE
    assert not torch.equal(again, first)
    # Counting works around compiled blocks (it hooks the transformer, whose blocks run no Python hooks).
    assert calls.as_record() == {"dit_calls": 2 * JOB["num_inference_steps"], "dit_calls_skipped": 0}
    with dit_speed.step_cache(stage.transformer, CacheOptions(method="first_block", threshold=0.3)) as cached:
        stage.denoise(embeds, **JOB)
    assert cached.skipped > 0
