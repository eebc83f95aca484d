"""Wan2.2-TI2V's denoising rules (``expand_timesteps``), exactly as WanPipeline and WanImageToVideoPipeline apply them.

A TI2V DiT takes one timestep per latent token instead of one per video. The
pipelines build them from a mask over the latent video, [1, 1, T, H, W]
float32: all ones for text-to-video (``WanPipeline``), zero on latent frame 0
for image-to-video (``WanImageToVideoPipeline``), where that frame is the
conditioning image's normalised VAE latents and is not denoised. Per step:

1. the DiT input: the latents (t2v), or ``(1 - mask) * condition + mask *
   latents`` (i2v: frame 0 replaced by the condition; the scheduler still
   steps the unreplaced latents, as the pipeline does);
2. the timestep: ``(mask[0, 0][::pt, ::ph, ::pw] * t).flatten()``, one per DiT
   token (the pipelines slice ``::2`` for the published (1, 2, 2) patches),
   repeated per batch row: so frame 0's tokens are at t = 0 in i2v;
3. after the loop (i2v): frame 0 replaced by the condition once more.

`workers.stages.transform.DenoiseStage` calls these three at its hook points;
nothing here knows about jobs, schedulers or guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpandedTimesteps:
    """One job's per-token timestep mask and, for i2v, the fixed first-frame condition [1, C, 1, H, W] float32."""

    mask: torch.Tensor
    condition: torch.Tensor | None
    patch_size: tuple[int, int, int]

    @classmethod
    def for_job(
        cls, latents: torch.Tensor, condition: torch.Tensor | None, patch_size: tuple[int, int, int]
    ) -> ExpandedTimesteps:
        """The rules for a job whose noise is ``latents`` [1, C, T, H, W]; ``condition`` None for t2v."""
        if condition is not None:
            expected = (latents.shape[0], latents.shape[1], 1, *latents.shape[3:])
            if tuple(condition.shape) != expected:
                raise ValueError(
                    f"condition is shaped {list(condition.shape)} but this job's latents need {list(expected)} "
                    "(the image's latents as the first latent frame); encode the image with the job's height and width"
                )
        mask = torch.ones(1, 1, *latents.shape[2:], dtype=torch.float32, device=latents.device)
        if condition is not None:
            mask[:, :, 0] = 0
        return cls(mask, condition, patch_size)

    def model_input(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The DiT's input this step: the latents with frame 0 replaced by the condition (i2v), in ``dtype``."""
        if self.condition is None:
            return latents.to(dtype)
        return ((1 - self.mask) * self.condition + self.mask * latents).to(dtype)

    def timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """[batch, tokens]: ``t`` for every token of a denoised frame, 0 for the condition frame's tokens."""
        pt, ph, pw = self.patch_size
        per_token = (self.mask[0, 0][::pt, ::ph, ::pw] * t).flatten()
        return per_token.unsqueeze(0).expand(batch, -1)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The loop's final latents with frame 0 set to the condition (i2v; t2v unchanged)."""
        if self.condition is None:
            return latents
        return (1 - self.mask) * self.condition + self.mask * latents
