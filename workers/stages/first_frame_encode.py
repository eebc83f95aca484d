"""The image half of the encode stage for Wan2.2-TI2V image-to-video: the image as the first latent frame.

Computes exactly what ``WanImageToVideoPipeline`` with ``expand_timesteps``
computes from its ``image`` argument (the TI2V branch of ``prepare_latents``):
no CLIP features; the image, resized to height x width by the pipeline's
``VideoProcessor`` (at the VAE's 16x scale), goes through the VAE encoder
alone (one frame, not the image-plus-zeros video of Wan2.1), takes the
posterior's mode, and is normalised with the VAE's latents_mean/latents_std in
float32. The transform stage keeps that latent frame fixed every step
(`workers.stages.ti2v`).

Lifecycle: 1. load the VAE once (``FirstFrameLatentStage``) 2. per job,
``encode``: the resize policy (`workers.stages.image_encode.policy_image`),
then ``condition`` [1, 48, 1, height / 16, width / 16] float32. No randomness:
the mode draws nothing, so the transform stage's noise is the pipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import torch
from diffusers.video_processor import VideoProcessor

from workers.models.loading import load_vae, vae_latent_stats
from workers.models.ti2v import vae_compression
from workers.stages.image_encode import ResizePolicy, policy_image
from workers.stages.payloads import CONDITION
from workers.stages.transform import latent_shape

# Wan2.2-TI2V-5B's DiT patches; read from transformer/config.json when the encode worker has it.
_TI2V_PATCH_SIZE = (1, 2, 2)


def _patch_size(model_dir: Path) -> tuple[int, int, int]:
    # The encode worker does not load the DiT; its config alone says which sizes the transform stage takes.
    try:
        patch = json.loads((model_dir / "transformer" / "config.json").read_text())["patch_size"]
        return int(patch[0]), int(patch[1]), int(patch[2])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return _TI2V_PATCH_SIZE


class FirstFrameLatentStage:
    """Keeps the Wan2.2 VAE resident and turns a conditioning image into TI2V's first-frame ``condition``."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.vae = load_vae(model_dir, self.device, dtype)
        self.compression = vae_compression(model_dir)
        self.patch_size = _patch_size(model_dir)
        self.z_dim = int(self.vae.config["z_dim"])
        # The pipeline's processor: Lanczos resize to the given size, RGB in [-1, 1].
        self.video_processor = VideoProcessor(vae_scale_factor=self.compression.spatial)
        # In float32 whatever the VAE's dtype: the pipeline normalises the condition in float32.
        self.latents_mean, self.latents_inv_std = vae_latent_stats(self.vae, self.device, torch.float32)

    @torch.no_grad()
    def encode(
        self,
        image: PIL.Image.Image,
        *,
        height: int,
        width: int,
        num_frames: int,
        policy: ResizePolicy = "resize",
    ) -> dict[str, torch.Tensor]:
        """``condition`` [1, z_dim, 1, height / 16, width / 16] float32: the image's normalised latents."""
        # Validates the size the way the transform stage will, before any compute.
        latent_shape(
            channels=self.z_dim,
            height=height,
            width=width,
            num_frames=num_frames,
            patch_size=self.patch_size,
            spatial=self.compression.spatial,
            temporal=self.compression.temporal,
        )
        source = policy_image(image, height, width, policy)
        pixels: torch.Tensor = self.video_processor.preprocess(source, height=height, width=width)
        return {CONDITION: self.first_frame_latents(pixels.to(self.device, torch.float32))}

    @torch.no_grad()
    def first_frame_latents(self, frame: torch.Tensor) -> torch.Tensor:
        """The normalised VAE latents of one frame [1, 3, H, W] in [-1, 1]: [1, z_dim, 1, H / 16, W / 16]."""
        video = frame.unsqueeze(2).to(self.device, self.vae.dtype)
        # The posterior's mode ("argmax"): deterministic, so no generator is consumed here.
        latents = self.vae.encode(video).latent_dist.mode()
        return (latents.to(self.device, torch.float32) - self.latents_mean) * self.latents_inv_std
