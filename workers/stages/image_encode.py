"""The image half of the i2v encode stage: a conditioning image to CLIP features and the VAE condition.

Computes exactly what ``WanImageToVideoPipeline`` computes from its ``image``
argument (``encode_image`` and the condition branch of ``prepare_latents``).

Lifecycle: 1. load the CLIP image processor, the CLIP vision encoder and the
VAE once (``ImageConditionStage``) 2. per job, ``encode``:

a. apply the resize policy (`prepare_condition_image`): "resize" stretches the
   image to height x width as the pipeline does; "center_crop" first crops it
   to that aspect ratio, so nothing is squashed;
b. ``image_embeds``: the penultimate hidden states of the CLIP vision encoder
   on the image, after the CLIP processor's own resize and crop (the pipeline
   gives CLIP the image as passed in, not the height x width one);
c. ``condition``: the conditioning video (the resized image as frame 0, then
   all-zero frames, mid-gray in pixel space) through the VAE encoder, taking the posterior's mode, then
   normalised with the VAE's latents_mean/latents_std, behind 4 mask channels
   that mark latent frame 0 as given.

No randomness is used: the pipeline encodes the condition with
``retrieve_latents(..., sample_mode="argmax")`` (the mode, not a sample) and
draws the initial noise from the job's generator *before* that, in
``prepare_latents``; CLIP draws nothing. So the transform stage, drawing the
noise from a fresh generator seeded with the job's seed, gets the pipeline's
noise exactly, and this stage needs no seed.

Which tensors cross to the transform stage: `workers.stages.payloads`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import PIL.Image
import torch
from diffusers.video_processor import VideoProcessor

from workers.models.loading import load_image_encoder, load_vae, vae_latent_stats
from workers.stages.payloads import CONDITION, IMAGE_EMBEDS, IMAGE_INPUT_NAMES
from workers.stages.transform import VAE_SCALE_SPATIAL, latent_shape

ResizePolicy = Literal["resize", "center_crop"]
RESIZE_POLICIES: tuple[ResizePolicy, ...] = get_args(ResizePolicy)

# WanImageToVideoPipeline.check_inputs demands height and width divisible by
# 16 whatever the DiT; Wan2.1's (1, 2, 2) patches on 8x latents are why.
_WAN21_PATCH_SIZE = (1, 2, 2)

# The pipeline's VideoProcessor: Lanczos resize, RGB scaled to [-1, 1]. The
# scale factor only matters when no size is given (it rounds sizes down to a
# multiple of it), and `prepare_condition_image` always gives one.
_VIDEO_PROCESSOR = VideoProcessor(vae_scale_factor=VAE_SCALE_SPATIAL)


def output_names() -> tuple[str, ...]:
    """The tensors the image stage hands to the transform stage."""
    return IMAGE_INPUT_NAMES


def crop_to_aspect_ratio(image: PIL.Image.Image, height: int, width: int) -> PIL.Image.Image:
    """The largest centred region of ``image`` with the aspect ratio width:height (the image itself if it has it)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive (got {height}x{width})")
    source_width, source_height = image.size
    # Compare ratios by cross-multiplying: exact for integers, so an image already at the ratio is left untouched.
    if source_width * height > source_height * width:  # too wide: trim the sides
        crop_width = max(1, min(source_width, round(source_height * width / height)))
        left = (source_width - crop_width) // 2
        return image.crop((left, 0, left + crop_width, source_height))
    if source_width * height < source_height * width:  # too tall: trim top and bottom
        crop_height = max(1, min(source_height, round(source_width * height / width)))
        top = (source_height - crop_height) // 2
        return image.crop((0, top, source_width, top + crop_height))
    return image


def policy_image(image: PIL.Image.Image, height: int, width: int, policy: ResizePolicy) -> PIL.Image.Image:
    """The image a job's encoders see before their own resizing: RGB, center-cropped under "center_crop"."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}: use one of {', '.join(RESIZE_POLICIES)}")
    # The pipeline's VideoProcessor does not convert modes (RGBA would give 4 channels); CLIP's
    # processor converts to RGB itself. For RGB input this is a no-op, so the pipeline match holds.
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return crop_to_aspect_ratio(rgb, height, width) if policy == "center_crop" else rgb


def prepare_condition_image(
    image: PIL.Image.Image, height: int, width: int, policy: ResizePolicy = "resize"
) -> torch.Tensor:
    """The conditioning frame the VAE encodes: [1, 3, height, width] float32 in [-1, 1].

    "resize" is exactly the pipeline's ``video_processor.preprocess(image,
    height, width)`` (a Lanczos stretch to the target size); "center_crop"
    crops to the target aspect ratio first, then does the same.
    """
    if height <= 0 or width <= 0 or height % VAE_SCALE_SPATIAL or width % VAE_SCALE_SPATIAL:
        # The processor would silently round such sizes down.
        raise ValueError(f"height and width must be positive multiples of {VAE_SCALE_SPATIAL} (got {height}x{width})")
    source = policy_image(image, height, width, policy)
    pixels: torch.Tensor = _VIDEO_PROCESSOR.preprocess(source, height=height, width=width)
    return pixels.to(dtype=torch.float32)


class ImageConditionStage:
    """Keeps the CLIP image encoder and the VAE resident and turns a conditioning image into the i2v inputs."""

    def __init__(
        self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, *, clip: bool = True
    ) -> None:
        model_dir = Path(model_dir)
        self.device = torch.device(device)
        # Without ``clip`` (Wan2.2-I2V-A14B, whose DiT takes no CLIP features) only the VAE condition is made.
        self.clip = clip
        if clip:
            self.image_processor, self.image_encoder = load_image_encoder(model_dir, self.device, dtype)
        self.vae = load_vae(model_dir, self.device, dtype)
        config = self.vae.config
        if config["patch_size"] is not None:
            raise ValueError("patchified VAEs (Wan2.2) are not supported by the image stage; use a Wan2.1 VAE")
        self.z_dim = int(config["z_dim"])
        # One mask channel per frame a latent frame stands for (the VAE's temporal factor, 4).
        self.mask_channels = int(config["scale_factor_temporal"])
        # In float32 whatever the VAE's dtype: the pipeline normalises the condition in float32.
        self.latents_mean, self.latents_inv_std = vae_latent_stats(self.vae, self.device, torch.float32)

    @property
    def condition_channels(self) -> int:
        """Channels of ``condition``: the mask's, then the VAE latents' (4 + 16 for Wan2.1)."""
        return self.mask_channels + self.z_dim

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
        """``image_embeds`` [1, tokens, clip_width] (encoder dtype) and ``condition`` [1, 20, T, h, w] float32."""
        # Validates the size the way the transform stage will, before any compute.
        latent_shape(
            channels=self.z_dim, height=height, width=width, num_frames=num_frames, patch_size=_WAN21_PATCH_SIZE
        )
        source = policy_image(image, height, width, policy)
        condition = self.condition(prepare_condition_image(source, height, width), num_frames=num_frames)
        if not self.clip:
            return {CONDITION: condition}
        return {IMAGE_EMBEDS: self.embed_image(source), CONDITION: condition}

    @torch.no_grad()
    def embed_image(self, image: PIL.Image.Image) -> torch.Tensor:
        """The CLIP vision encoder's penultimate hidden states for ``image`` (WanImageToVideoPipeline.encode_image)."""
        inputs = self.image_processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.image_encoder(**inputs, output_hidden_states=True)
        hidden_states: torch.Tensor = outputs.hidden_states[-2]
        return hidden_states

    @torch.no_grad()
    def condition(self, first_frame: torch.Tensor, *, num_frames: int) -> torch.Tensor:
        """The 20-channel condition for a video whose first frame is ``first_frame`` [1, 3, H, W] in [-1, 1]."""
        first_frame = first_frame.to(self.device, torch.float32)
        _, channels, height, width = first_frame.shape
        # The rest of the conditioning video is the pipeline's zeros: mid-gray in [-1, 1] pixel space, not
        # black. They are encoded too, because the causal encoder's latents for them are part of the condition.
        rest = first_frame.new_zeros(1, channels, num_frames - 1, height, width)
        video = torch.cat([first_frame.unsqueeze(2), rest], dim=2).to(self.device, self.vae.dtype)
        # The posterior's mode ("argmax"): deterministic, so no generator is consumed here.
        latents = self.vae.encode(video).latent_dist.mode()
        latents = (latents.to(self.device, torch.float32) - self.latents_mean) * self.latents_inv_std

        latent_frames, latent_height, latent_width = latents.shape[2:]
        # The pipeline builds this as a per-frame mask (first frame given, the rest not), repeats the
        # first frame to a full latent frame's worth and folds frames into channels: all that is left
        # is ones on latent frame 0 and zeros elsewhere, float32 like torch.ones.
        mask = torch.zeros(1, self.mask_channels, latent_frames, latent_height, latent_width, device=self.device)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1)
