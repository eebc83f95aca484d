"""The transform stage: text embeddings to denoised video latents with the Wan DiT, as ``WanPipeline.__call__`` does.

Lifecycle: 1. load the transformer and the scheduler config once
(``DenoiseStage``) 2. per job, ``denoise``: build a fresh scheduler, draw the
initial noise from the job's seed exactly as WanPipeline does with
``generator=torch.Generator("cpu").manual_seed(seed)``, run the flow-matching
loop with classifier-free guidance, reporting each step and stopping at a
step boundary when asked 3. return float32 latents *before* the VAE's
latents_mean/latents_std denormalisation, which the decode stage applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from workers.models.loading import check_model_dir, fresh_scheduler, load_scheduler, load_transformer
from workers.stages import StageCancelled
from workers.stages.encode import NEGATIVE_PROMPT_EMBEDS, PROMPT_EMBEDS, uses_cfg

# Wan2.1's VAE: 8x spatial and 4x temporal compression (1 + 4k frames -> 1 + k latent frames).
VAE_SCALE_SPATIAL = 8
VAE_SCALE_TEMPORAL = 4

OnStep = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


def latent_shape(
    *, channels: int, height: int, width: int, num_frames: int, patch_size: tuple[int, int, int]
) -> tuple[int, int, int, int, int]:
    """The [1, C, T, H, W] latent shape of a video, refusing sizes WanPipeline would silently round."""
    multiple_h = VAE_SCALE_SPATIAL * patch_size[1]
    multiple_w = VAE_SCALE_SPATIAL * patch_size[2]
    if height <= 0 or width <= 0 or height % multiple_h or width % multiple_w:
        raise ValueError(f"height and width must be positive multiples of {multiple_h}x{multiple_w} (got {height}x{width})")
    if num_frames < 1 or (num_frames - 1) % VAE_SCALE_TEMPORAL:
        raise ValueError(f"num_frames must be 1 + {VAE_SCALE_TEMPORAL}k, e.g. 17, 33, 81 (got {num_frames})")
    latent_frames = (num_frames - 1) // VAE_SCALE_TEMPORAL + 1
    return (1, channels, latent_frames, height // VAE_SCALE_SPATIAL, width // VAE_SCALE_SPATIAL)


class DenoiseStage:
    """Keeps the Wan DiT resident and runs one job's denoising loop at a time."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        model_dir = Path(model_dir)
        check_model_dir(model_dir, ("transformer", "scheduler"))
        self.device = torch.device(device)
        self.transformer = load_transformer(model_dir, self.device, dtype)
        # A template only: schedulers keep per-job state, so each job gets its own copy.
        self.scheduler_template = load_scheduler(model_dir, flow_shift=None)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.transformer.dtype
        return dtype

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
        on_step: OnStep | None = None,
        should_stop: ShouldStop | None = None,
    ) -> torch.Tensor:
        """Final latents [1, 16, 1 + (num_frames - 1) / 4, height / 8, width / 8], float32.

        ``on_step(i, total)`` runs after step i (1-based); ``should_stop()`` is
        asked before every step and raises `StageCancelled` when it says True.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1 (got {num_inference_steps})")
        cfg = uses_cfg(guidance_scale)
        prompt_embeds, negative_embeds = self._conditioning(embeds, cfg)

        scheduler = fresh_scheduler(self.scheduler_template, flow_shift)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        # WanPipeline pins the begin index to skip a device-to-host sync; step() then walks from 0.
        scheduler.set_begin_index(0)

        latents = self.initial_latents(height=height, width=width, num_frames=num_frames, seed=seed)
        total = len(timesteps)
        for step_index, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                raise StageCancelled(f"stopped before denoising step {step_index + 1} of {total}")
            noise_pred = self._predict_noise(latents, t, prompt_embeds, negative_embeds, guidance_scale)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(step_index + 1, total)
        return latents.float()

    def initial_latents(self, *, height: int, width: int, num_frames: int, seed: int) -> torch.Tensor:
        """The job's starting noise: float32, drawn on the CPU so every device gets the same numbers."""
        shape = latent_shape(
            channels=self.transformer.config["in_channels"],
            height=height,
            width=width,
            num_frames=num_frames,
            patch_size=tuple(self.transformer.config["patch_size"]),
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        latents: torch.Tensor = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return latents

    def _conditioning(
        self, embeds: Mapping[str, torch.Tensor], cfg: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        required = (PROMPT_EMBEDS, NEGATIVE_PROMPT_EMBEDS) if cfg else (PROMPT_EMBEDS,)
        missing = [name for name in required if name not in embeds]
        if missing:
            raise ValueError(f"denoise needs {', '.join(missing)} from the encode stage (guidance on: {cfg})")
        prompt_embeds = embeds[PROMPT_EMBEDS].to(self.device, self.dtype)
        negative_embeds = embeds[NEGATIVE_PROMPT_EMBEDS].to(self.device, self.dtype) if cfg else None
        return prompt_embeds, negative_embeds

    def _predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        model_input = latents.to(self.dtype)
        timestep = t.expand(latents.shape[0])
        # Conditional and unconditional passes run separately, not as one batch
        # of two: that is what WanPipeline does, and batching changes the
        # floating-point results.
        cond = self._forward(model_input, timestep, prompt_embeds)
        if negative_embeds is None:
            return cond
        uncond = self._forward(model_input, timestep, negative_embeds)
        return uncond + guidance_scale * (cond - uncond)

    def _forward(self, model_input: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.transformer(
            hidden_states=model_input, timestep=timestep, encoder_hidden_states=text, return_dict=False
        )[0]
        return output
