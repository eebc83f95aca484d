"""The transform stage: encoded inputs to denoised video latents with the Wan DiT.

It runs the denoising loop of ``WanPipeline.__call__`` (text-to-video) or of
``WanImageToVideoPipeline.__call__`` (image-to-video, Wan2.1), whichever the
loaded transformer is.

Lifecycle: 1. load the transformer and the scheduler config once
(``DenoiseStage``) 2. per job, ``denoise``: check the inputs are the ones this
transformer takes (`workers.stages.payloads`), build a fresh scheduler, draw
the initial noise from the job's seed exactly as the pipelines do with
``generator=torch.Generator("cpu").manual_seed(seed)``, run the flow-matching
loop with classifier-free guidance -- for i2v, every step's DiT input is the
latents with the image ``condition`` concatenated on the channels, and the DiT
also cross-attends to ``image_embeds`` -- reporting each step and stopping at
a step boundary when asked 3. return float32 latents *before* the VAE's
latents_mean/latents_std denormalisation, which the decode stage applies.
A Wan2.2-TI2V DiT (``expand_timesteps``) takes one timestep per token and, for
i2v, keeps latent frame 0 fixed to the image's latents: `workers.stages.ti2v`,
called at three hook points (DiT input, timestep, final latents).

Wan2.2-A14B (two experts): the high-noise DiT (``transformer``) denoises the
timesteps at or above ``boundary_ratio * num_train_timesteps`` and the
low-noise one (``transformer_2``) the rest, with ``guidance_scale_2`` there,
as in the pipelines. A worker loads both (``experts: together``) or one
(``experts: split``: its hop covers only that expert's steps,
``expert_steps``); the loop picks the DiT per step either way.

Resumable: at every step boundary ``at_boundary`` may take a `DenoiseState`
(the latents and the scheduler's multistep memory after step n); ``denoise``
given one (``resume=``) skips the steps it covers and continues bit-exactly.
Where the state is stored is the caller's business (`workers.checkpoints`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from workers.models.loading import Expert, fresh_scheduler, load_scheduler, load_transformer, model_boundary_ratio
from workers.models.ti2v import expands_timesteps, vae_compression
from workers.stages import StageCancelled, dit_speed
from workers.stages.denoise_inputs import VAE_SCALE_SPATIAL as VAE_SCALE_SPATIAL
from workers.stages.denoise_inputs import VAE_SCALE_TEMPORAL as VAE_SCALE_TEMPORAL
from workers.stages.denoise_inputs import Conditioning
from workers.stages.denoise_inputs import latent_shape as latent_shape
from workers.stages.denoise_state import DenoiseState
from workers.stages.dit_calls import GuidedDitCalls, RankSender
from workers.stages.dit_calls import call_dit as call_dit
from workers.stages.payloads import (
    CONDITION,
    IMAGE_EMBEDS,
    IMAGE_INPUT_NAMES,
    NEGATIVE_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    TEXT_LENGTH,
    uses_cfg,
)
from workers.stages.step_batcher import StepBatcher
from workers.stages.ti2v import ExpandedTimesteps

OnStep = Callable[[int, int], None]
ShouldStop = Callable[[], bool]

# Called after every step with (steps done, total, a way to capture the state now); may raise to stop there.
AtBoundary = Callable[[int, int, Callable[[], DenoiseState]], None]


class DenoiseStage(GuidedDitCalls):
    """Keeps the Wan DiT resident and runs one job's denoising loop at a time (t2v or i2v, as the DiT is)."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        one_pass_guidance: bool = False,
        compile_blocks: bool = False,
        attention_backend: str | None = None,
        batch_jobs: bool = False,
        experts: Sequence[Expert] | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        self.device = torch.device(device)
        # A two-expert model's boundary; None for a one-DiT model, whose only DiT is "high" here.
        self.boundary_ratio = model_boundary_ratio(model_dir)
        wanted: Sequence[Expert] = ("high",) if self.boundary_ratio is None else (experts or ("high", "low"))
        self.experts: dict[Expert, Any] = {
            expert: load_transformer(model_dir, self.device, dtype, expert=expert) for expert in wanted
        }
        # The first loaded DiT: what one-DiT code paths (LoRA loading, quantization, rank groups) act on.
        self.transformer = next(iter(self.experts.values()))
        # A template only: schedulers keep per-job state, so each job gets its own copy.
        self.scheduler_template = load_scheduler(model_dir, flow_shift=None)
        # Latent sizes come from the VAE's config (8x for Wan2.1, 16x for Wan2.2-TI2V), read without loading it.
        self.compression = vae_compression(model_dir)
        # Wan2.2-TI2V: one timestep per token, the i2v condition as latent frame 0 (`workers.stages.ti2v`).
        self.expand_timesteps = expands_timesteps(model_dir)
        # Off by default here so the class alone reproduces WanPipeline bit for bit; the farm's
        # setting (TransformSettings.one_pass_guidance) turns it on.
        self.one_pass_guidance = one_pass_guidance
        self.compile_blocks = compile_blocks
        self.attention_backend = attention_backend
        for dit in self.experts.values():
            dit_speed.prepare_transformer(dit, compile_blocks=compile_blocks, attention_backend=attention_backend)
        # With batch_jobs, denoise() may run in several threads at once (a batch of jobs, one thread
        # each) and their steps share DiT calls (`workers.stages.step_batcher`).
        self.batcher = StepBatcher(self._batched_forward, one_pass=one_pass_guidance) if batch_jobs else None
        # Set when the DiT runs context-parallel over a rank group (`workers.dit_group`): every call goes
        # through it, so the followers make the same call.
        self.rank_sender: RankSender | None = None

    def speed_options(self) -> dict[str, object]:
        """The options this DiT runs with, for the job record (they change rounding, not what a job asks)."""
        return {
            "one_pass_guidance": self.one_pass_guidance,
            "compiled": self.compile_blocks,
            "attention_backend": self.attention_backend or "default",
        }

    @property
    def boundary_timestep(self) -> float | None:
        """The timestep from which down the low-noise expert takes over (diffusers' comparison: ``t >= b``)."""
        if self.boundary_ratio is None:
            return None
        return self.boundary_ratio * float(self.scheduler_template.config["num_train_timesteps"])

    def expert_at(self, t: torch.Tensor | float) -> Expert:
        """Which expert denoises at timestep ``t`` ("high" for a one-DiT model)."""
        boundary = self.boundary_timestep
        return "high" if boundary is None or t >= boundary else "low"

    def expert_steps(self, num_inference_steps: int, flow_shift: float | None) -> int:
        """How many leading steps of a job the high-noise expert runs (all of them for a one-DiT model).

        Read from a fresh scheduler's timesteps, as the loop sees them, so a split job's two hops (each on
        a worker holding one expert) meet at the step where the pipelines switch DiTs.
        """
        scheduler = fresh_scheduler(self.scheduler_template, flow_shift)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return sum(1 for t in scheduler.timesteps if self.expert_at(t) == "high")

    def dit_for(self, expert: Expert) -> Any:
        """The loaded DiT of ``expert``; a one-line error when this worker did not load it."""
        dit = self.experts.get(expert)
        if dit is None:
            held = ", ".join(self.experts)
            raise ValueError(
                f"this step needs the {expert}-noise expert but this worker holds only the {held}-noise one; "
                "run the job's expert hops on workers started with the matching --expert"
            )
        return dit

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.transformer.dtype
        return dtype

    @property
    def latent_channels(self) -> int:
        """Channels of the latents being denoised (16): the DiT's output, not its input (36 for i2v)."""
        return int(self.transformer.config["out_channels"])

    @property
    def condition_channels(self) -> int:
        """Channels of the i2v ``condition`` this DiT takes on top of the latents (20 for Wan2.1-I2V; 0 for t2v)."""
        return int(self.transformer.config["in_channels"]) - self.latent_channels

    @property
    def takes_image(self) -> bool:
        """Whether this DiT is an image-to-video one (it needs ``image_embeds`` and ``condition``)."""
        # Only Wan2.1-I2V DiTs take CLIP features; the pipeline keys on image_dim the same way.
        return self.transformer.config["image_dim"] is not None and self.condition_channels > 0

    @property
    def takes_condition_only(self) -> bool:
        """Whether this DiT is an image-to-video one without CLIP (Wan2.2-I2V-A14B): ``condition`` alone."""
        return self.transformer.config["image_dim"] is None and self.condition_channels > 0

    @torch.no_grad()
    def denoise(
        self,
        embeds: Mapping[str, torch.Tensor],
        *,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
        flow_shift: float | None,
        guidance_scale_2: float | None = None,
        on_step: OnStep | None = None,
        should_stop: ShouldStop | None = None,
        resume: DenoiseState | None = None,
        at_boundary: AtBoundary | None = None,
        stop_after: int | None = None,
    ) -> torch.Tensor:
        """Final latents [1, 16, 1 + (num_frames - 1) / 4, height / 8, width / 8], float32 (TI2V: [1, 48, ..., / 16]).

        ``embeds`` holds the encode stage's tensors (`workers.stages.payloads`):
        the text embeddings, and for an i2v DiT ``image_embeds`` and
        ``condition`` too. ``on_step(i, total)`` runs after step i (1-based);
        ``should_stop()`` is asked before every step and raises
        `StageCancelled` when it says True. ``resume`` continues a loop saved
        after its step ``resume.step``; ``at_boundary`` runs after ``on_step``.
        ``stop_after`` ends the loop after that step (a split route's first part): the latents returned
        are mid-denoise, and the state to continue from is what ``at_boundary`` captures at that step (also
        when the loop ends there without running a step: a hop whose expert has no steps in this job).
        ``guidance_scale_2`` guides the low-noise expert's steps (None: ``guidance_scale``).
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1 (got {num_inference_steps})")
        if guidance_scale_2 is not None and self.boundary_ratio is None:
            raise ValueError("guidance_scale_2 is for a two-expert (Wan2.2-A14B) model; this DiT is a one-expert one")
        cfg = uses_cfg(guidance_scale)
        conditioning = self._conditioning(embeds, cfg)

        scheduler = fresh_scheduler(self.scheduler_template, flow_shift)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        # WanPipeline pins the begin index to skip a device-to-host sync; step() then walks from 0.
        scheduler.set_begin_index(0)

        latents = self.initial_latents(height=height, width=width, num_frames=num_frames, seed=seed)
        ti2v = self._expanded_timesteps(conditioning, latents)
        if ti2v is None:
            self._check_condition_shape(conditioning, latents)
        self._check_splits_over_ranks(latents)
        total = len(timesteps)
        done = 0
        if resume is not None:
            done = self._resumed(resume, scheduler, latents, total)
            latents = resume.latents.to(self.device)
        # A step-cached job runs alone (the worker never batches one): the cache decides per DiT call,
        # so sharing calls would make its frames depend on its batch-mates.
        # A TI2V job runs alone too: the batcher shares one timestep per row, not one per token.
        batcher = self.batcher if self.batcher is not None and not self.transformer.is_cache_enabled else None
        batcher = None if ti2v is not None else batcher
        if stop_after is not None and stop_after == done and at_boundary is not None:
            # Nothing to run in this range (resumed at its end, or an expert with no steps in this job).
            at_boundary(done, total, functools.partial(DenoiseState.capture, done, total, latents, scheduler))
        joined = batcher.member(f"seed {seed}") if batcher is not None else contextlib.nullcontext(None)
        with joined as member:
            for step_index, t in enumerate(timesteps):
                if stop_after is not None and step_index >= stop_after:
                    break
                if step_index < done:
                    continue
                if should_stop is not None and should_stop():
                    raise StageCancelled(f"stopped before denoising step {step_index + 1} of {total}")
                expert = self.expert_at(t)
                scale = guidance_scale_2 if expert == "low" and guidance_scale_2 is not None else guidance_scale
                dit = self.dit_for(expert)
                noise_pred = self._predict_noise(latents, t, conditioning, scale, member, dit, ti2v)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(step_index + 1, total)
                if at_boundary is not None:
                    at_boundary(
                        step_index + 1,
                        total,
                        functools.partial(DenoiseState.capture, step_index + 1, total, latents, scheduler),
                    )
        if ti2v is not None:
            latents = ti2v.finish(latents)
        return latents.float()

    def _resumed(self, state: DenoiseState, scheduler: Any, latents: torch.Tensor, total: int) -> int:
        """Steps ``state`` already covers, after checking it fits this job and loading it into ``scheduler``."""
        saved = state.tensors.get("latents")
        if saved is None or tuple(saved.shape) != tuple(latents.shape) or saved.dtype != latents.dtype:
            raise ValueError("saved denoising state does not match this job's latents; it belongs to another job")
        # Step 0 (a high-noise hop that had no steps) and step total (one that ran them all) are states too.
        if state.total != total or not 0 <= state.step <= total:
            raise ValueError(f"saved denoising state is at step {state.step} of {state.total}; this job has {total}")
        state.restore_into(scheduler, self.device)
        return state.step

    def initial_latents(self, *, height: int, width: int, num_frames: int, seed: int) -> torch.Tensor:
        """The job's starting noise: float32, drawn on the CPU so every device gets the same numbers.

        For i2v too this is the pipelines' first draw from the job's generator:
        WanImageToVideoPipeline draws it before encoding the image condition,
        which takes the VAE posterior's mode and so draws nothing.
        """
        shape = latent_shape(
            channels=self.latent_channels,
            height=height,
            width=width,
            num_frames=num_frames,
            patch_size=tuple(self.transformer.config["patch_size"]),
            spatial=self.compression.spatial,
            temporal=self.compression.temporal,
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        latents: torch.Tensor = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return latents

    def _conditioning(self, embeds: Mapping[str, torch.Tensor], cfg: bool) -> Conditioning:
        required = (PROMPT_EMBEDS, NEGATIVE_PROMPT_EMBEDS) if cfg else (PROMPT_EMBEDS,)
        missing = [name for name in required if name not in embeds]
        if missing:
            raise ValueError(f"denoise needs {', '.join(missing)} from the encode stage (guidance on: {cfg})")
        prompt_embeds = embeds[PROMPT_EMBEDS].to(self.device, self.dtype)
        negative_embeds = embeds[NEGATIVE_PROMPT_EMBEDS].to(self.device, self.dtype) if cfg else None
        given_image_inputs = [name for name in IMAGE_INPUT_NAMES if name in embeds]
        if self.expand_timesteps:
            return self._ti2v_conditioning(embeds, prompt_embeds, negative_embeds)
        if self.takes_condition_only:
            if IMAGE_EMBEDS in embeds or CONDITION not in embeds:
                raise ValueError(
                    "this transformer is a Wan2.2 image-to-video one: it takes the image's condition and no "
                    "image_embeds (CLIP features); encode the job with the same model directory"
                )
            # float32, as WanImageToVideoPipeline keeps the condition; the DiT input is cast per step.
            return Conditioning(prompt_embeds, negative_embeds, embeds[CONDITION].to(self.device, torch.float32))
        if not self.takes_image:
            if given_image_inputs:
                raise ValueError(
                    f"this transformer is a text-to-video model but the job carries {', '.join(given_image_inputs)}; "
                    "run image-to-video jobs on workers serving a Wan2.1-I2V model"
                )
            return Conditioning(prompt_embeds, negative_embeds)
        missing = [name for name in IMAGE_INPUT_NAMES if name not in embeds]
        if missing:
            raise ValueError(
                f"this transformer is an image-to-video model and needs {', '.join(missing)} from the encode stage; "
                "submit an image-to-video job (with an image) or serve a t2v model"
            )
        for name, tensor in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_embeds)):
            # diffusers' Wan i2v attention takes all but the last TEXT_LENGTH context tokens as image tokens.
            if tensor is not None and tensor.shape[1] != TEXT_LENGTH:
                raise ValueError(
                    f"{name} has {tensor.shape[1]} tokens; image-to-video needs them padded to {TEXT_LENGTH} "
                    f"(encode with max_sequence_length={TEXT_LENGTH})"
                )
        return Conditioning(
            prompt_embeds,
            negative_embeds,
            # The pipeline keeps the condition in float32 and casts only the concatenated DiT input.
            condition=embeds[CONDITION].to(self.device, torch.float32),
            image_embeds=embeds[IMAGE_EMBEDS].to(self.device, self.dtype),
        )

    def _ti2v_conditioning(
        self, embeds: Mapping[str, torch.Tensor], prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None
    ) -> Conditioning:
        """A TI2V DiT's inputs: the text, and for i2v ``condition`` (the image's first latent frame), no CLIP."""
        if IMAGE_EMBEDS in embeds:
            raise ValueError(
                "this transformer is a Wan2.2-TI2V model, which takes no image_embeds (CLIP features); "
                "encode the job with the same TI2V model directory"
            )
        condition = embeds.get(CONDITION)
        # float32, as WanImageToVideoPipeline keeps the condition; the DiT input is cast after the blend.
        return Conditioning(
            prompt_embeds, negative_embeds, None if condition is None else condition.to(self.device, torch.float32)
        )

    def _expanded_timesteps(self, conditioning: Conditioning, latents: torch.Tensor) -> ExpandedTimesteps | None:
        if not self.expand_timesteps:
            return None
        if self.rank_sender is not None:
            raise ValueError(
                "this worker runs the DiT context-parallel, which sends one timestep per row; a Wan2.2-TI2V model "
                "needs one per token: serve it on a worker without transform.context_parallel"
            )
        patch_size = tuple(int(v) for v in self.transformer.config["patch_size"])
        return ExpandedTimesteps.for_job(latents, conditioning.condition, (patch_size[0], patch_size[1], patch_size[2]))

    def _check_splits_over_ranks(self, latents: torch.Tensor) -> None:
        """Context parallelism splits the DiT's token sequence into equal parts, one per rank."""
        if self.rank_sender is None:
            return
        t, h, w = latents.shape[2:]
        pt, ph, pw = self.transformer.config["patch_size"]
        tokens = (t // pt) * (h // ph) * (w // pw)
        if tokens % self.rank_sender.size:
            raise ValueError(
                f"this job's {tokens} DiT tokens do not split over the worker's {self.rank_sender.size} context-parallel "
                "ranks; pick a size whose latent area divides evenly, or run it on a worker without transform.context_parallel"
            )

    def _check_condition_shape(self, conditioning: Conditioning, latents: torch.Tensor) -> None:
        if conditioning.condition is None:
            return
        expected = (latents.shape[0], self.condition_channels, *latents.shape[2:])
        if tuple(conditioning.condition.shape) != expected:
            raise ValueError(
                f"condition is shaped {list(conditioning.condition.shape)} but this job's latents need "
                f"{list(expected)}; encode the image with the job's height, width and num_frames"
            )
