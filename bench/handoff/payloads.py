"""The payloads the bench moves: production-size tensors, the same in every process (seeded)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _text_embeds(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # umT5-XXL output for a prompt and the negative prompt (CFG): 2 x [1, 512, 4096] bfloat16.
    return {
        "prompt_embeds": torch.randn(1, 512, 4096, generator=gen).to(torch.bfloat16),
        "negative_prompt_embeds": torch.randn(1, 512, 4096, generator=gen).to(torch.bfloat16),
    }


def _latents_480p(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # 81 frames at 832x480 -> 21 latent frames of 104x60, 16 channels.
    return {"latents": torch.randn(1, 16, 21, 60, 104, generator=gen)}


def _latents_720p(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # 81 frames at 1280x720 -> 21 latent frames of 160x90, 16 channels.
    return {"latents": torch.randn(1, 16, 21, 90, 160, generator=gen)}


PAYLOADS: dict[str, Callable[[torch.Generator], dict[str, torch.Tensor]]] = {
    "text": _text_embeds,
    "480p": _latents_480p,
    "720p": _latents_720p,
}
PAYLOAD_LABELS = {
    "text": "text embeddings 2x[1,512,4096] bf16",
    "480p": "latents 480p [1,16,21,60,104] f32",
    "720p": "latents 720p [1,16,21,90,160] f32",
}


def make_payload(name: str) -> dict[str, torch.Tensor]:
    """The payload's tensors, the same in every process (seeded)."""
    return PAYLOADS[name](torch.Generator().manual_seed(1234))


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rq_job_target(tensors: dict[str, torch.Tensor]) -> int:
    """What an rq worker would run with the tensors (the bench only enqueues and fetches)."""
    return payload_bytes(tensors)
