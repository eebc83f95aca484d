"""The DiT calls of one denoising step: guidance (two passes as WanPipeline, or one batch of two), the
step batcher's shared calls, the expert each row's timestep picks, the context-parallel rank group.

`GuidedDitCalls` is the half of `workers.stages.transform.DenoiseStage` that calls the DiT; the loop, its
inputs and its state are the other half.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from workers.models.loading import Expert
from workers.stages import dit_speed
from workers.stages.denoise_inputs import Conditioning
from workers.stages.step_batcher import Member, StepBatcher, StepRequest
from workers.stages.ti2v import ExpandedTimesteps


class RankSender(Protocol):
    """What the loop needs of a context-parallel rank group (``workers.dit_group.DitCallSender``): declared here
    so the stage depends on the seam, not on the group module that imports this one."""

    size: int

    def send_call(
        self, model_input: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor: ...


def call_dit(
    transformer: torch.nn.Module,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    image: torch.Tensor | None,
) -> torch.Tensor:
    """One forward of the Wan DiT: the noise prediction for ``model_input`` at ``timestep`` (one per row)."""
    output: torch.Tensor = transformer(
        hidden_states=model_input,
        timestep=timestep,
        encoder_hidden_states=text,
        encoder_hidden_states_image=image,
        return_dict=False,
    )[0]
    return output


class GuidedDitCalls:
    """The noise prediction of a step from one or more DiT forwards (mixed into `DenoiseStage`)."""

    transformer: Any
    batcher: StepBatcher | None
    one_pass_guidance: bool
    rank_sender: RankSender | None

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    def expert_at(self, t: torch.Tensor | float) -> Expert:
        raise NotImplementedError

    def dit_for(self, expert: Expert) -> Any:
        raise NotImplementedError

    def _predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
        member: Member | None = None,
        dit: Any = None,
        ti2v: ExpandedTimesteps | None = None,
    ) -> torch.Tensor:
        dit = self.transformer if dit is None else dit
        if ti2v is not None:
            model_input, timestep = ti2v.model_input(latents, self.dtype), ti2v.timestep(t, latents.shape[0])
        elif conditioning.condition is None:
            model_input, timestep = latents.to(self.dtype), t.expand(latents.shape[0])
        else:
            model_input = torch.cat([latents, conditioning.condition], dim=1).to(self.dtype)
            timestep = t.expand(latents.shape[0])
        if member is not None and self.batcher is not None:
            return self._predict_in_batch(self.batcher, member, model_input, timestep, conditioning, guidance_scale)
        if conditioning.negative_embeds is None:
            return self._forward(
                model_input, timestep, conditioning.prompt_embeds, conditioning.image_embeds, "cond", dit=dit
            )
        if self.one_pass_guidance:
            # One DiT call on a batch of 2 (cond, uncond): the same maths with fewer, larger kernels,
            # but batched kernels round differently from WanPipeline's two calls (see the tests' tolerance).
            text = torch.cat([conditioning.prompt_embeds, conditioning.negative_embeds])
            image = conditioning.image_embeds
            both = self._forward(
                torch.cat([model_input, model_input]),
                torch.cat([timestep, timestep]),
                text,
                None if image is None else torch.cat([image, image]),
                "cond_uncond",
                dit=dit,
            )
            cond, uncond = both.chunk(2)
        else:
            # WanPipeline's way: two calls. Both passes see the same image inputs.
            cond = self._forward(
                model_input, timestep, conditioning.prompt_embeds, conditioning.image_embeds, "cond", dit=dit
            )
            uncond = self._forward(
                model_input, timestep, conditioning.negative_embeds, conditioning.image_embeds, "uncond", dit=dit
            )
        return uncond + guidance_scale * (cond - uncond)

    def _predict_in_batch(
        self,
        batcher: StepBatcher,
        member: Member,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """``_predict_noise`` with this job's DiT call shared with its batch-mates' (the same guidance maths)."""
        texts: tuple[torch.Tensor, ...] = (conditioning.prompt_embeds,)
        if conditioning.negative_embeds is not None:
            texts = (conditioning.prompt_embeds, conditioning.negative_embeds)
        outputs = batcher.step(member, StepRequest(model_input, timestep.reshape(1), texts, conditioning.image_embeds))
        # This job's share of the calls: one per step with one-pass guidance (or no guidance), else one per text.
        dit_speed.count_dit_calls(1 if self.one_pass_guidance else len(texts))
        if len(outputs) == 1:
            return outputs[0]
        cond, uncond = outputs
        return uncond + guidance_scale * (cond - uncond)

    def _batched_forward(
        self, model_input: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor:
        experts = [self.expert_at(t) for t in timestep]
        if len(set(experts)) == 1:
            return self._forward(model_input, timestep, text, image, "batch", counted=False, dit=self.dit_for(experts[0]))
        # Batch-mates on both sides of the boundary (experts together): each expert's rows in one call.
        output = torch.empty(
            (model_input.shape[0], self.latent_channels, *model_input.shape[2:]),
            dtype=self.dtype,
            device=model_input.device,
        )
        for expert in dict.fromkeys(experts):
            rows = torch.tensor([i for i, e in enumerate(experts) if e == expert], device=model_input.device)
            output[rows] = self._forward(
                model_input[rows],
                timestep[rows],
                text[rows],
                None if image is None else image[rows],
                "batch",
                counted=False,
                dit=self.dit_for(expert),
            )
        return output

    def _forward(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor | None,
        context: str,
        *,
        counted: bool = True,
        dit: Any = None,
    ) -> torch.Tensor:
        dit = self.transformer if dit is None else dit
        # A step cache keeps one state per named call (cond and uncond must not share one), as the pipelines name them.
        with dit_speed.cache_context(dit, context):
            if self.rank_sender is not None:
                # The follower ranks make the same call with what is sent (timesteps as float32).
                timestep = self.rank_sender.send_call(model_input, timestep, text, image)
            output = call_dit(dit, model_input, timestep, text, image)
            if counted:
                # Inside the cache context: whether this call ran every block is read from its state.
                dit_speed.count_dit_calls(1, dit)
        return output
