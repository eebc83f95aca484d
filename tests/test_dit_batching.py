"""Batching compatible jobs in the transform stage (`workers.stages.step_batcher`).

Each job of a batch denoises in its own thread and shares only the DiT calls. What must hold:
each job's latents equal its solo run within ``LATENT_TOLERANCE`` (batched kernels round
differently, as one-pass guidance does: tests/test_dit_speed.py), fewer DiT calls than the solo
runs together, and isolation -- a job cancelled mid-batch leaves at its next step boundary, a job
with a malformed input fails alone, and the others finish with their solo latents.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.stages import StageCancelled, dit_speed
from workers.stages.encode import TextEncodeStage
from workers.stages.step_batcher import StepBatcher, StepRequest
from workers.stages.transform import DenoiseStage

STAGE_TASK = "t2v"
SHAPE: dict[str, Any] = {"height": 64, "width": 64, "num_frames": 9, "flow_shift": None}
LATENT_TOLERANCE = 1e-4  # as tests/test_dit_speed.py: batching moves latents by ~1e-6 here
JOBS: list[dict[str, Any]] = [
    {"prompt": "a red fox running through snow", "seed": 1, "num_inference_steps": 5, "guidance_scale": 5.0},
    {"prompt": "a lighthouse at dusk", "seed": 2, "num_inference_steps": 4, "guidance_scale": 3.0},
    {"prompt": "rain on a window", "seed": 3, "num_inference_steps": 6, "guidance_scale": 5.0},
]


@pytest.fixture(scope="module", params=[True, False], ids=["one-pass", "two-pass"])
def batching_stage(request: pytest.FixtureRequest, tiny_model_dir: Path) -> DenoiseStage:
    return DenoiseStage(tiny_model_dir, one_pass_guidance=request.param, batch_jobs=True)


@pytest.fixture(scope="module")
def solo_stage(batching_stage: DenoiseStage, tiny_model_dir: Path) -> DenoiseStage:
    return DenoiseStage(tiny_model_dir, one_pass_guidance=batching_stage.one_pass_guidance)


@pytest.fixture(scope="module")
def job_embeds(encoder: TextEncodeStage) -> list[dict[str, torch.Tensor]]:
    return [encoder.encode(job["prompt"], "blurry", job["guidance_scale"]) for job in JOBS]


@pytest.fixture(scope="module")
def solo_latents(solo_stage: DenoiseStage, job_embeds: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [solo_stage.denoise(embeds, **_args(job)) for job, embeds in zip(JOBS, job_embeds, strict=True)]


def _args(job: dict[str, Any]) -> dict[str, Any]:
    return {**SHAPE, **{k: v for k, v in job.items() if k != "prompt"}}


def run_in_threads(targets: list[Callable[[], torch.Tensor]]) -> list[torch.Tensor | BaseException]:
    """Run each target in its own thread, as the worker runs a batch; a raised exception is its result."""
    results: list[torch.Tensor | BaseException] = [RuntimeError("never ran")] * len(targets)

    def run(index: int) -> None:
        try:
            results[index] = targets[index]()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a batched job never finished: the batcher waited on a job that left"
    return results


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_each_job_of_a_batch_equals_its_solo_run(
    batching_stage: DenoiseStage, job_embeds: list[dict[str, torch.Tensor]], solo_latents: list[torch.Tensor]
) -> None:
    batcher = batching_stage.batcher
    assert batcher is not None
    calls_before = batcher.calls
    counted: list[dit_speed.DitCalls] = []

    def job(index: int) -> Callable[[], torch.Tensor]:
        def denoise() -> torch.Tensor:
            with dit_speed.step_cache(batching_stage.transformer, None) as calls:
                counted.append(calls)
                return batching_stage.denoise(job_embeds[index], **_args(JOBS[index]))

        return denoise

    results = run_in_threads([job(i) for i in range(len(JOBS))])

    for result, solo in zip(results, solo_latents, strict=True):
        assert isinstance(result, torch.Tensor), result
        assert result.shape == solo.shape
        assert max_difference(result, solo) < LATENT_TOLERANCE
    assert batcher.largest_batch == len(JOBS)
    solo_calls = sum(job["num_inference_steps"] for job in JOBS) * (1 if batching_stage.one_pass_guidance else 2)
    # Steps differ (5, 4, 6): the longest job's last steps run alone; every other call is shared.
    assert batcher.calls - calls_before < solo_calls
    # Each job's record counts its own share of the calls, as a solo run would.
    per_step = 1 if batching_stage.one_pass_guidance else 2
    assert sorted(c.calls for c in counted) == sorted(j["num_inference_steps"] * per_step for j in JOBS)
    assert batcher.joined() == 0


def test_a_job_cancelled_mid_batch_leaves_at_its_next_step_and_the_others_finish(
    batching_stage: DenoiseStage, job_embeds: list[dict[str, torch.Tensor]], solo_latents: list[torch.Tensor]
) -> None:
    steps_done: list[int] = []

    def cancelled_job() -> torch.Tensor:
        return batching_stage.denoise(
            job_embeds[0],
            **_args(JOBS[0]),
            on_step=lambda done, total: steps_done.append(done),
            should_stop=lambda: len(steps_done) >= 2,
        )

    results = run_in_threads(
        [cancelled_job]
        + [lambda i=i: batching_stage.denoise(job_embeds[i], **_args(JOBS[i])) for i in range(1, len(JOBS))]
    )

    assert isinstance(results[0], StageCancelled)
    assert "before denoising step 3" in str(results[0])
    assert steps_done == [1, 2]
    for result, solo in zip(results[1:], solo_latents[1:], strict=True):
        assert isinstance(result, torch.Tensor), result
        assert max_difference(result, solo) < LATENT_TOLERANCE


def test_a_malformed_input_fails_its_job_alone(
    batching_stage: DenoiseStage, job_embeds: list[dict[str, torch.Tensor]], solo_latents: list[torch.Tensor]
) -> None:
    missing_negative = {"prompt_embeds": job_embeds[0]["prompt_embeds"]}  # guidance on needs the negative too

    results = run_in_threads(
        [lambda: batching_stage.denoise(missing_negative, **_args(JOBS[0]))]
        + [lambda i=i: batching_stage.denoise(job_embeds[i], **_args(JOBS[i])) for i in range(1, len(JOBS))]
    )

    assert isinstance(results[0], ValueError)
    assert "negative_prompt_embeds" in str(results[0])
    for result, solo in zip(results[1:], solo_latents[1:], strict=True):
        assert isinstance(result, torch.Tensor), result
        assert max_difference(result, solo) < LATENT_TOLERANCE


def test_a_job_that_joins_late_shares_calls_at_another_step(
    batching_stage: DenoiseStage, job_embeds: list[dict[str, torch.Tensor]], solo_latents: list[torch.Tensor]
) -> None:
    """The second job starts after the first did two steps: their calls mix timesteps, the latents do not."""
    first_at_two = threading.Event()

    def first() -> torch.Tensor:
        return batching_stage.denoise(
            job_embeds[2], **_args(JOBS[2]), on_step=lambda done, total: done == 2 and first_at_two.set()
        )

    def late() -> torch.Tensor:
        assert first_at_two.wait(timeout=120)
        return batching_stage.denoise(job_embeds[1], **_args(JOBS[1]))

    batcher = batching_stage.batcher
    assert batcher is not None
    batcher.largest_batch = 0
    results = run_in_threads([first, late])

    assert batcher.largest_batch == 2
    for result, solo in zip(results, [solo_latents[2], solo_latents[1]], strict=True):
        assert isinstance(result, torch.Tensor), result
        assert max_difference(result, solo) < LATENT_TOLERANCE


def _fake_request(value: float, size: int = 4) -> StepRequest:
    return StepRequest(
        model_input=torch.full((1, 1, 1, size, size), value),
        timestep=torch.tensor([value]),
        texts=(torch.full((1, 2, 3), value), torch.full((1, 2, 3), -value)),
        image=None,
    )


def test_requests_of_other_shapes_run_in_their_own_call_and_a_failing_call_fails_only_its_jobs() -> None:
    shapes_seen: list[tuple[int, ...]] = []

    def forward(
        inputs: torch.Tensor, steps: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor:
        shapes_seen.append(tuple(inputs.shape))
        if inputs.shape[-1] == 8:
            raise RuntimeError("out of memory")
        # Each row's output says which job and which text it came from.
        return inputs + text[:, :1, :1].reshape(-1, 1, 1, 1, 1)

    batcher = StepBatcher(forward, one_pass=True)
    results: dict[str, Any] = {}
    ready = threading.Barrier(3)

    def job(name: str, request: StepRequest) -> None:
        with batcher.member(name) as member:
            ready.wait()
            try:
                results[name] = batcher.step(member, request)
            except RuntimeError as exc:
                results[name] = exc

    threads = [
        threading.Thread(target=job, args=("a", _fake_request(1.0))),
        threading.Thread(target=job, args=("b", _fake_request(2.0))),
        threading.Thread(target=job, args=("big", _fake_request(3.0, size=8))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(shapes_seen) == [(2, 1, 1, 8, 8), (4, 1, 1, 4, 4)]
    assert isinstance(results["big"], RuntimeError)
    for name, value in (("a", 1.0), ("b", 2.0)):
        cond, uncond = results[name]
        assert torch.equal(cond, torch.full((1, 1, 1, 4, 4), 2 * value))
        assert torch.equal(uncond, torch.zeros(1, 1, 1, 4, 4))
    assert batcher.joined() == 0
