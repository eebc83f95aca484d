"""The decode stage: denoised latents to uint8 RGB frames, streamed one latent frame at a time.

Lifecycle: 1. load the VAE once (``StreamingVaeDecoder``) 2. per job,
``iter_frames``: apply WanPipeline's latents_mean/latents_std
denormalisation, then run the VAE's own causal decoder on one latent frame at
a time, carrying its per-convolution cache between calls, and yield each chunk
of frames as soon as it exists (1 frame for the first latent frame, then 4 per
latent frame). Peak memory is one chunk's activations, not the whole video's.

The chunks concatenate to exactly what ``vae.decode`` on the whole latent
video followed by ``VideoProcessor.postprocess_video(output_type="np")`` gives,
converted with `frames_to_uint8`: ``AutoencoderKLWan._decode`` itself loops
over latent frames with the same cache, and every step after the decoder is
per-pixel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
from diffusers.video_processor import VideoProcessor

from workers.models.loading import load_vae, vae_latent_stats


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (diffusers' ``output_type="np"``) to uint8, rounding to nearest."""
    return np.round(frames * 255).astype(np.uint8)


class StreamingVaeDecoder:
    """Keeps the Wan VAE resident and decodes latent videos chunk by chunk."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.vae = load_vae(Path(model_dir), self.device, dtype)
        config = self.vae.config
        # The Wan2.2 VAE's decoder outputs 2x2 pixel patches as channels (12 = 3 x 2 x 2): `to_frames`
        # unpatchifies each chunk, as AutoencoderKLWan._decode does the whole video (a per-frame reshape).
        self.patch_size: int | None = config["patch_size"]
        self.z_dim = int(config["z_dim"])
        self.frames_per_latent_frame = int(config["scale_factor_temporal"])
        self.latents_mean, self.latents_inv_std = vae_latent_stats(self.vae, self.device, self.vae.dtype)
        # One cache slot per causal convolution in the decoder, as AutoencoderKLWan.clear_cache sizes it.
        self.cache_slots = sum(isinstance(module, WanCausalConv3d) for module in self.vae.decoder.modules())
        self.video_processor = VideoProcessor(vae_scale_factor=int(config["scale_factor_spatial"]))

    @property
    def decoder_spatial_factor(self) -> int:
        """Decoder-output pixels per latent pixel: 8 for both VAEs (Wan2.2's 16x is 8x, then 2x2 patches)."""
        return int(self.vae.config["scale_factor_spatial"]) // (self.patch_size or 1)

    def frame_count(self, latents: torch.Tensor) -> int:
        """How many RGB frames ``latents`` [1, C, T, H, W] decode to: 1 + 4 * (T - 1)."""
        return 1 + self.frames_per_latent_frame * (int(latents.shape[2]) - 1)

    @torch.no_grad()
    def iter_frames(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """Yield uint8 frame chunks [n, H, W, 3]: n = 1 for the first latent frame, then 4 per latent frame."""
        self.check_latents(latents)
        for chunk in self.decoder_steps(self.vae.post_quant_conv(self.denormalize(latents))):
            yield self.to_frames(chunk)

    @torch.no_grad()
    def decoder_steps(self, decoder_input: torch.Tensor) -> Iterator[torch.Tensor]:
        """The causal decoder over ``decoder_input`` (post_quant_conv's output), one latent frame per call.

        Yields the decoder's float output per latent frame [1, 3, n, 8H, 8W] (Wan2.2: [1, 12, n, 8H, 8W], 2x2
        patches that `to_frames` unpatchifies); the sharded decoder runs the same loop on its spatial shard.
        """
        # The decoder's causal state lives here, per call, so an abandoned
        # iterator leaves nothing behind on the shared VAE.
        feat_cache: list[torch.Tensor | None] = [None] * self.cache_slots
        for index in range(decoder_input.shape[2]):
            feat_idx = [0]  # each decoder call walks the cache slots from the first
            yield self.vae.decoder(
                decoder_input[:, :, index : index + 1],
                feat_cache=feat_cache,
                feat_idx=feat_idx,
                first_chunk=index == 0,
            )

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalisation the DiT works in (WanPipeline does this before ``vae.decode``)."""
        latents = latents.to(self.device, dtype=self.vae.dtype)
        return latents / self.latents_inv_std + self.latents_mean

    def to_frames(self, chunk: torch.Tensor) -> np.ndarray:
        if self.patch_size is not None:
            chunk = unpatchify(chunk, patch_size=self.patch_size)
        video = torch.clamp(chunk, min=-1.0, max=1.0)
        frames = self.video_processor.postprocess_video(video, output_type="np")[0]
        return frames_to_uint8(frames)

    def check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != self.z_dim:
            raise ValueError(f"expected latents shaped [1, {self.z_dim}, T, H, W], got {list(latents.shape)}")
