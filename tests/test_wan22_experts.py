"""Wan2.2-A14B's two experts in the stages: the denoising loop switches DiTs where diffusers' WanPipeline does,
and a loop split at the boundary over two workers (one expert each) gives the same latents bit for bit.

Unit-level (no servers): the tiny two-expert model, CPU float32, one-pass guidance off, so every comparison
is exact. The farm-level route (queues, hand-off over Mooncake, SIGKILL) is in ``tests/test_wan22_farm.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.models.loading import ModelDirError, model_boundary_ratio, model_task
from workers.stages.denoise_state import DenoiseState
from workers.stages.encode import TextEncodeStage
from workers.stages.transform import DenoiseStage

PROMPT, NEGATIVE = "a red fox running through snow", "blurry"
JOB: dict[str, Any] = {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 6, "guidance_scale": 5.0}
SEED = 7


@pytest.fixture(scope="module")
def embeds(tiny_two_expert_model_dir: Path) -> dict[str, torch.Tensor]:
    return TextEncodeStage(tiny_two_expert_model_dir).encode(PROMPT, NEGATIVE, JOB["guidance_scale"])


@pytest.fixture(scope="module")
def both(tiny_two_expert_model_dir: Path) -> DenoiseStage:
    return DenoiseStage(tiny_two_expert_model_dir)


def pipeline_latents(model_dir: Path, **overrides: Any) -> torch.Tensor:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    job = {**JOB, **overrides}
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="latent",
        **job,
    ).frames
    latents: torch.Tensor = out
    return latents


def test_the_tiny_two_expert_dir_is_a_wan22_layout(tiny_two_expert_model_dir: Path) -> None:
    index = json.loads((tiny_two_expert_model_dir / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    assert model_task(tiny_two_expert_model_dir) == "t2v"
    assert model_boundary_ratio(tiny_two_expert_model_dir) == 0.875
    high = (tiny_two_expert_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    low = (tiny_two_expert_model_dir / "transformer_2" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert high != low, "the experts must have distinct weights, or a step on the wrong one would not show"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"boundary_ratio": None}, "sets transformer_2 but no boundary_ratio"),
        ({"transformer_2": [None, None]}, "sets boundary_ratio but no transformer_2"),
        ({"boundary_ratio": 1.5}, "boundary_ratio 1.5; it must be a number between 0 and 1"),
        ({"expand_timesteps": True}, "expand_timesteps"),
    ],
)
def test_malformed_expert_settings_are_refused_in_one_line(
    tiny_two_expert_model_dir: Path, tmp_path: Path, edit: dict[str, Any], message: str
) -> None:
    model_dir = tmp_path / "edited"
    shutil.copytree(tiny_two_expert_model_dir, model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    (model_dir / "model_index.json").write_text(json.dumps({**index, **edit}))
    with pytest.raises(ModelDirError, match=message) as refused:
        model_task(model_dir)
    assert "\n" not in str(refused.value)


def test_both_experts_on_one_worker_equal_wanpipeline_with_a_low_noise_guidance_of_its_own(
    tiny_two_expert_model_dir: Path, both: DenoiseStage, embeds: dict[str, torch.Tensor]
) -> None:
    ours = both.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.0, **JOB)
    reference = pipeline_latents(tiny_two_expert_model_dir, guidance_scale_2=2.0)
    assert torch.equal(ours, reference.float())
    # guidance_scale_2 is used (for the low-noise steps only), and the second expert matters.
    same_guidance = both.denoise(embeds, seed=SEED, flow_shift=None, **JOB)
    assert not torch.equal(ours, same_guidance)
    assert torch.equal(same_guidance, pipeline_latents(tiny_two_expert_model_dir).float())


def test_the_boundary_step_is_where_wanpipeline_switches_experts(both: DenoiseStage) -> None:
    for steps, shift in ((6, None), (4, None), (10, 5.0), (1, None), (40, 12.0)):
        scheduler_timesteps = _timesteps(both, steps, shift)
        expected = sum(1 for t in scheduler_timesteps if t >= 0.875 * 1000)
        assert both.expert_steps(steps, shift) == expected
    assert both.expert_steps(6, None) == 2, "the tiny job's boundary lies inside its steps"


def _timesteps(stage: DenoiseStage, steps: int, shift: float | None) -> list[float]:
    from workers.models.loading import fresh_scheduler

    scheduler = fresh_scheduler(stage.scheduler_template, shift)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def test_split_over_two_one_expert_workers_equals_one_worker_with_both(
    tiny_two_expert_model_dir: Path, both: DenoiseStage, embeds: dict[str, torch.Tensor]
) -> None:
    high = DenoiseStage(tiny_two_expert_model_dir, experts=("high",))
    low = DenoiseStage(tiny_two_expert_model_dir, experts=("low",))
    assert list(high.experts) == ["high"] and list(low.experts) == ["low"], "each worker loads only its expert"
    boundary = high.expert_steps(JOB["num_inference_steps"], None)
    captured: list[DenoiseState] = []

    def keep(done: int, total: int, capture: Any) -> None:
        if done == boundary:
            captured.append(capture())

    high.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.0, at_boundary=keep, stop_after=boundary, **JOB)
    assert [state.step for state in captured] == [boundary]
    split = low.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.0, resume=captured[0], **JOB)
    together = both.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.0, **JOB)
    assert torch.equal(split, together)
    # A worker holding one expert refuses a step of the other's, naming the fix.
    with pytest.raises(ValueError, match="holds only the low-noise one"):
        low.denoise(embeds, seed=SEED, flow_shift=None, **JOB)


def test_an_expert_with_no_steps_in_a_job_hands_its_state_on_unchanged(
    tiny_two_expert_model_dir: Path, both: DenoiseStage, embeds: dict[str, torch.Tensor]
) -> None:
    # One step at shift 3: t = 999 >= 875, so the high-noise expert runs it all and the low one has none.
    one_step = {**JOB, "num_inference_steps": 1}
    assert both.expert_steps(1, None) == 1
    high = DenoiseStage(tiny_two_expert_model_dir, experts=("high",))
    low = DenoiseStage(tiny_two_expert_model_dir, experts=("low",))
    captured: list[DenoiseState] = []
    keep = lambda done, total, capture: captured.append(capture())  # noqa: E731
    high.denoise(embeds, seed=SEED, flow_shift=None, at_boundary=keep, stop_after=1, **one_step)
    assert [state.step for state in captured] == [1]
    final = low.denoise(embeds, seed=SEED, flow_shift=None, resume=captured[0], **one_step)
    assert torch.equal(final, both.denoise(embeds, seed=SEED, flow_shift=None, **one_step))


def test_guidance_scale_2_on_a_one_expert_model_is_refused(denoiser: DenoiseStage, encoder: TextEncodeStage) -> None:
    embeds = encoder.encode(PROMPT, NEGATIVE, 5.0)
    with pytest.raises(ValueError, match="guidance_scale_2 is for a two-expert"):
        denoiser.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.0, **JOB)


STAGE_TASK = "t2v"


# --- Wan2.2-I2V-A14B: the image as the VAE condition only (no CLIP), two experts --------------------------


def test_two_expert_i2v_split_over_two_workers_equals_wan_image_to_video_pipeline(
    tiny_two_expert_i2v_model_dir: Path,
) -> None:
    from diffusers import WanImageToVideoPipeline

    from tests.test_i2v_stages import noise_image
    from workers.models.loading import dit_takes_clip_features, model_task
    from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
    from workers.stages.image_encode import ImageConditionStage
    from workers.stages.payloads import CONDITION, IMAGE_EMBEDS

    model_dir = tiny_two_expert_i2v_model_dir
    assert model_task(model_dir) == "i2v" and not dit_takes_clip_features(model_dir)
    assert not (model_dir / "image_encoder").exists(), "Wan2.2-I2V-A14B ships no CLIP tower"
    image = noise_image(3)
    job = {**JOB, "guidance_scale": 4.0}
    embeds = dict(TextEncodeStage(model_dir).encode(PROMPT, NEGATIVE, job["guidance_scale"]))
    image_inputs = ImageConditionStage(model_dir, clip=False).encode(
        image, height=job["height"], width=job["width"], num_frames=job["num_frames"]
    )
    assert set(image_inputs) == {CONDITION} and IMAGE_EMBEDS not in image_inputs
    embeds.update(image_inputs)

    high = DenoiseStage(model_dir, experts=("high",))
    low = DenoiseStage(model_dir, experts=("low",))
    assert high.takes_condition_only
    boundary = high.expert_steps(job["num_inference_steps"], None)
    assert 0 < boundary < job["num_inference_steps"], "the boundary (0.9) falls inside the job's steps"
    captured: list[DenoiseState] = []

    def keep(done: int, total: int, capture: Any) -> None:
        if done == boundary:
            captured.append(capture())

    high.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.5, at_boundary=keep, stop_after=boundary, **job)
    latents = low.denoise(embeds, seed=SEED, flow_shift=None, guidance_scale_2=2.5, resume=captured[0], **job)

    pipe = WanImageToVideoPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    common = {
        "image": image,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "height": job["height"],
        "width": job["width"],
        "num_frames": job["num_frames"],
        "num_inference_steps": job["num_inference_steps"],
        "guidance_scale": job["guidance_scale"],
        "guidance_scale_2": 2.5,
    }
    reference = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **common).frames
    assert torch.equal(latents, reference.float())
    frames = pipe(generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **common).frames[0]
    decoder = StreamingVaeDecoder(model_dir)
    ours = np.concatenate(list(decoder.iter_frames(latents)))
    assert np.array_equal(ours, frames_to_uint8(np.asarray(frames)))


def test_a_low_noise_expert_lora_equals_wanpipeline_with_it_loaded_into_transformer_2(
    tiny_two_expert_model_dir: Path, embeds: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    import hashlib

    from diffusers import WanPipeline

    from workers.models.tiny_lora import build_tiny_lora
    from workers.stages.lora_adapters import AdapterChoice, LoraAdapters

    lora = build_tiny_lora(tmp_path / "low-style", seed=3)
    high = DenoiseStage(tiny_two_expert_model_dir, experts=("high",))
    low = DenoiseStage(tiny_two_expert_model_dir, experts=("low",))
    # The farm applies an expert-targeted LoRA on that expert's workers only (workers.lora_assets).
    adapters = LoraAdapters(low.transformer, capacity=2)
    chosen = AdapterChoice("low_style", hashlib.sha256(lora.read_bytes()).hexdigest(), 0.9)
    adapters.ensure_loaded(chosen, lora.read_bytes())
    boundary = high.expert_steps(JOB["num_inference_steps"], None)
    captured: list[DenoiseState] = []
    keep = lambda done, total, capture: captured.append(capture()) if done == boundary else None  # noqa: E731
    high.denoise(embeds, seed=SEED, flow_shift=None, at_boundary=keep, stop_after=boundary, **JOB)
    with adapters.activated([chosen]):
        latents = low.denoise(embeds, seed=SEED, flow_shift=None, resume=captured[0], **JOB)

    pipe = WanPipeline.from_pretrained(str(tiny_two_expert_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="low_style", load_into_transformer_2=True)
    pipe.transformer_2.set_adapters(["low_style"], [0.9])
    assert not getattr(pipe.transformer, "peft_config", None), "loaded into the low-noise expert only"
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="latent",
        **JOB,
    ).frames
    assert torch.equal(latents, out.float())
    assert not torch.equal(latents, pipeline_latents(tiny_two_expert_model_dir)), "the LoRA changed the video"
