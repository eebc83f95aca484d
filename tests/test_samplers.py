"""Few-step, guidance-free jobs: a model's sampler (``model_options.MODEL.sampler``) and default LoRAs.

A 4-step guidance-free job on the Euler flow-matching sampler with a distillation-style LoRA always on
equals WanPipeline with the same scheduler, LoRA and guidance 1.0; it makes one DiT call per step and
the encode stage computes no negative prompt. Submission adds a model's default LoRAs to its jobs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from scheduler.core.model_catalog import ModelChooser
from scheduler.core.model_options import SamplerSettings
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError
from tests.test_stages_match_wanpipeline import NEGATIVE_PROMPT, PROMPT, denoise, run_pipeline
from workers.models.tiny_lora import build_tiny_lora
from workers.stages import dit_speed
from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
from workers.stages.encode import TextEncodeStage
from workers.stages.lora_adapters import AdapterChoice, LoraAdapters
from workers.stages.samplers import sampler_template
from workers.stages.transform import DenoiseStage

STAGE_TASK = "t2v"
FEW_STEP = {"guidance_scale": 1.0, "num_inference_steps": 4}
SEED = 5


def test_a_guidance_free_four_step_job_on_the_euler_sampler_with_a_lora_equals_wanpipeline(
    encoder: TextEncodeStage, decoder: StreamingVaeDecoder, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    distill = build_tiny_lora(tmp_path / "distill", seed=4)
    sampler = SamplerSettings(solver="euler", shift=5.0)
    stage = DenoiseStage(tiny_model_dir)
    model_dirs_own = stage.scheduler_template
    stage.scheduler_template = sampler_template(model_dirs_own, sampler)
    adapters = LoraAdapters(stage.transformer, capacity=1)
    choice = AdapterChoice("distill", hashlib.sha256(distill.read_bytes()).hexdigest(), 1.0)
    adapters.ensure_loaded(choice, distill.read_bytes())

    assert set(encoder.encode(PROMPT, NEGATIVE_PROMPT, guidance_scale=1.0)) == {"prompt_embeds"}
    with adapters.activated([choice]), dit_speed.step_cache(stage.transformer, None) as calls:
        latents = denoise(encoder, stage, seed=SEED, **FEW_STEP)
    assert calls.as_record() == {"dit_calls": 4, "dit_calls_skipped": 0}  # one DiT call per step

    pipe = WanPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=5.0)
    pipe.load_lora_weights(str(distill), adapter_name="distill")
    pipe.set_adapters(["distill"], [1.0])
    expected = run_pipeline(pipe, seed=SEED, output_type="latent", **FEW_STEP)
    expected_frames = frames_to_uint8(run_pipeline(pipe, seed=SEED, **FEW_STEP)[0])

    assert torch.equal(latents, expected)
    frames = np.concatenate(list(decoder.iter_frames(latents)))
    assert np.abs(frames.astype(np.int16) - expected_frames.astype(np.int16)).max() <= 1
    # The sampler matters: the model dir's own UniPC schedule gives another video.
    stage.scheduler_template = model_dirs_own
    with adapters.activated([choice]):
        assert not torch.equal(denoise(encoder, stage, seed=SEED, **FEW_STEP), latents)


def test_sampler_settings_build_the_asked_scheduler(tiny_model_dir: Path) -> None:
    template = DenoiseStage(tiny_model_dir).scheduler_template
    assert sampler_template(template, None) is template
    unipc = sampler_template(template, SamplerSettings(shift=5.0))
    assert type(unipc).__name__ == "UniPCMultistepScheduler" and unipc.config["flow_shift"] == 5.0
    euler = sampler_template(template, SamplerSettings(solver="euler", shift=3.0))
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config["shift"] == 3.0


def test_submission_adds_a_models_default_loras_before_the_jobs_own() -> None:
    settings = FarmSettings.model_validate(
        {
            "loras": {"distill": "/l/d.safetensors", "style": "/l/s.safetensors"},
            "model_options": {"default": {"loras": [{"name": "distill"}], "sampler": {"solver": "euler"}}},
            "limits": {"max_loras": 2},
        }
    )
    chooser = ModelChooser(settings)
    spec = chooser.resolve(JobSpec(prompt="a", loras=[{"name": "style", "scale": 0.5}]), named=True)
    assert [(c.name, c.scale) for c in spec.loras] == [("distill", 1.0), ("style", 0.5)]
    # A job naming the default LoRA itself sets its scale.
    spec = chooser.resolve(JobSpec(prompt="a", loras=[{"name": "distill", "scale": 0.7}]), named=True)
    assert [(c.name, c.scale) for c in spec.loras] == [("distill", 0.7)]
    with pytest.raises(SpecError, match="with model 'default''s 1 default LoRAs this job has 3, over"):
        chooser.resolve(JobSpec(prompt="a", loras=[{"name": "style"}, {"name": "x"}]), named=True)


def test_options_for_a_model_the_farm_does_not_serve_are_refused() -> None:
    with pytest.raises(ValueError, match="model_options 'fast' is not a model of this farm"):
        FarmSettings.model_validate({"model_options": {"fast": {"sampler": {"solver": "euler"}}}})
