"""The encode stage: prompt text to umT5 embeddings, exactly as diffusers' ``WanPipeline.encode_prompt``.

Lifecycle: 1. load the tokenizer and text encoder once (``TextEncodeStage``)
2. per job, ``encode`` the prompt and, when classifier-free guidance is on
(guidance_scale > 1), the negative prompt. The outputs are the tensors the
transform stage needs; which ones cross the boundary is declared in
`workers.stages.payloads` (``output_names`` gives this stage's share). For
image-to-video jobs the encode worker also runs
`workers.stages.image_encode.ImageConditionStage`.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The pipeline's own prompt cleaning (ftfy when installed, HTML unescape,
# whitespace folding): reusing it keeps the embeddings bit-identical to
# WanPipeline's on any install.
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from workers.models.loading import load_text_encoder
from workers.stages.payloads import (
    NEGATIVE_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    TEXT_LENGTH,
    transform_input_names,
    uses_cfg,
)

__all__ = ["NEGATIVE_PROMPT_EMBEDS", "PROMPT_EMBEDS", "TextEncodeStage", "output_names", "uses_cfg"]


def output_names(guidance_scale: float) -> tuple[str, ...]:
    """The tensors the text encoder hands to the transform stage for a job with this guidance scale."""
    return transform_input_names("t2v", guidance_scale)


class TextEncodeStage:
    """Keeps the tokenizer and umT5 encoder resident and turns prompts into padded embeddings."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.tokenizer, self.text_encoder = load_text_encoder(Path(model_dir), self.device, dtype)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.text_encoder.dtype
        return dtype

    def encode(
        self, prompt: str, negative_prompt: str, guidance_scale: float, max_sequence_length: int = TEXT_LENGTH
    ) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` (and ``negative_prompt_embeds`` when CFG is on), each [1, max_sequence_length, d_model]."""
        embeds = {PROMPT_EMBEDS: self.embed(prompt, max_sequence_length)}
        if uses_cfg(guidance_scale):
            # WanPipeline encodes an empty negative prompt rather than skipping it.
            embeds[NEGATIVE_PROMPT_EMBEDS] = self.embed(negative_prompt or "", max_sequence_length)
        return embeds

    @torch.no_grad()
    def embed(self, text: str, max_sequence_length: int) -> torch.Tensor:
        """One text's umT5 hidden states, cut to its real tokens and zero-padded to ``max_sequence_length``."""
        tokens = self.tokenizer(
            [prompt_clean(text)],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids, mask).last_hidden_state.to(self.dtype)
        # The pipeline zeroes every padded position (not just masks it), so the
        # DiT's cross-attention sees exact zeros there; keep that.
        real_tokens = int(mask[0].gt(0).sum())
        padded = torch.zeros_like(hidden)
        padded[:, :real_tokens] = hidden[:, :real_tokens]
        return padded
