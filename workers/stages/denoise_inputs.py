"""What a denoising loop is given: the latent shape of a video and one job's conditioning tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Wan2.1's VAE: 8x spatial and 4x temporal compression (1 + 4k frames -> 1 + k latent frames).
VAE_SCALE_SPATIAL = 8
VAE_SCALE_TEMPORAL = 4


def latent_shape(
    *,
    channels: int,
    height: int,
    width: int,
    num_frames: int,
    patch_size: tuple[int, int, int],
    spatial: int = VAE_SCALE_SPATIAL,
    temporal: int = VAE_SCALE_TEMPORAL,
) -> tuple[int, int, int, int, int]:
    """The [1, C, T, H, W] latent shape of a video, refusing sizes WanPipeline would silently round.

    ``spatial`` / ``temporal``: the VAE's compression (Wan2.1's 8 / 4 by default; Wan2.2-TI2V's VAE is 16 / 4).
    """
    multiple_h = spatial * patch_size[1]
    multiple_w = spatial * patch_size[2]
    if height <= 0 or width <= 0 or height % multiple_h or width % multiple_w:
        raise ValueError(
            f"height and width must be positive multiples of {multiple_h}x{multiple_w} (got {height}x{width})"
        )
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be 1 + {temporal}k, e.g. 17, 33, 81 (got {num_frames})")
    latent_frames = (num_frames - 1) // temporal + 1
    return (1, channels, latent_frames, height // spatial, width // spatial)


@dataclass(frozen=True)
class Conditioning:
    """One job's inputs to every DiT call, on the stage's device."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    # i2v only: concatenated to the latents on the channel axis every step (float32, as the pipeline keeps it).
    condition: torch.Tensor | None = None
    # i2v only: CLIP features the DiT cross-attends to beside the text.
    image_embeds: torch.Tensor | None = None
