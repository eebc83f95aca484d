"""Which tensors cross the encode -> transform boundary, per task, declared as data.

The encode worker packs exactly these tensors into its slot and the transform
worker's `DenoiseStage` reads exactly these names, so the two sides (and the
descriptor's per-tensor entries) agree on one table. Shapes are for one
video; ``L`` is the text length (always 512: WanPipeline pads to it, and the
Wan i2v attention processor hard-codes it to split image from text tokens),
``T = 1 + (num_frames - 1) / 4`` latent frames, ``h, w = height / 8, width / 8``.

===========================  =====  ==========  ===================================  =======================
name                         task   when        shape (real Wan2.1 / tiny)           dtype
===========================  =====  ==========  ===================================  =======================
``prompt_embeds``            both   always      [1, L, 4096] / [1, L, 32]            text encoder's
``negative_prompt_embeds``   both   CFG on      [1, L, 4096] / [1, L, 32]            text encoder's
``image_embeds``             i2v    always      [1, 257, 1280] / [1, 17, 32]         image encoder's
``condition``                i2v    always      [1, 20, T, h, w]                     float32
===========================  =====  ==========  ===================================  =======================

``condition`` is 4 first-frame mask channels followed by the 16 normalised
VAE latent channels of the conditioning video (the image, then zero frames);
WanImageToVideoPipeline builds it in float32 whatever the model dtypes, and so
does the image stage. CFG is on when guidance_scale > 1.

Wan2.2-TI2V image-to-video (``expand_timesteps``, no image encoder) sends no
``image_embeds``, and its ``condition`` is the image's normalised VAE latents
alone, [1, 48, 1, height / 16, width / 16] float32: the latent frame the DiT
keeps fixed (`workers.stages.first_frame_encode`, `workers.stages.ti2v`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only the type: slot sizing reads this table without loading any model code.
    from workers.models.loading import ModelTask

PROMPT_EMBEDS = "prompt_embeds"
NEGATIVE_PROMPT_EMBEDS = "negative_prompt_embeds"
IMAGE_EMBEDS = "image_embeds"
CONDITION = "condition"

# ``L`` above: WanPipeline pads every prompt to it, and diffusers' Wan i2v attention assumes it
# to tell image tokens from text ones.
TEXT_LENGTH = 512


@dataclass(frozen=True)
class TransformInput:
    """One tensor the transform stage takes from the encode stage, and for which jobs."""

    name: str
    produced_by: str
    tasks: frozenset[ModelTask]
    only_with_guidance: bool


TRANSFORM_INPUTS: tuple[TransformInput, ...] = (
    TransformInput(PROMPT_EMBEDS, "text encoder", frozenset({"t2v", "i2v"}), only_with_guidance=False),
    TransformInput(NEGATIVE_PROMPT_EMBEDS, "text encoder", frozenset({"t2v", "i2v"}), only_with_guidance=True),
    TransformInput(IMAGE_EMBEDS, "image encoder (CLIP)", frozenset({"i2v"}), only_with_guidance=False),
    TransformInput(CONDITION, "VAE encoder", frozenset({"i2v"}), only_with_guidance=False),
)
IMAGE_INPUT_NAMES: tuple[str, ...] = tuple(spec.name for spec in TRANSFORM_INPUTS if spec.tasks == {"i2v"})


def uses_cfg(guidance_scale: float) -> bool:
    """Whether a job runs classifier-free guidance (WanPipeline: guidance_scale > 1)."""
    return guidance_scale > 1.0


def transform_input_names(task: ModelTask, guidance_scale: float) -> tuple[str, ...]:
    """The tensors a ``task`` job with this guidance scale hands from the encode to the transform stage."""
    cfg = uses_cfg(guidance_scale)
    return tuple(spec.name for spec in TRANSFORM_INPUTS if task in spec.tasks and (cfg or not spec.only_with_guidance))
