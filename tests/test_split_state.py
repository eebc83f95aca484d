"""A split loop's hand-off of its state (``workers.stages.split_state``): round trip, and refusals of what is malformed."""

from __future__ import annotations

import json

import pytest
import torch

from workers.stages.denoise_state import DenoiseState
from workers.stages.split_state import MAX_META_BYTES, META, SplitStateError, conditioning_of, state_of, state_tensors


def _state() -> DenoiseState:
    tensors = {"latents": torch.randn(1, 4, 2, 3, 3), "scheduler.model_outputs.1": torch.randn(1, 4, 2, 3, 3)}
    return DenoiseState(3, 6, tensors, {"model_outputs": {"list": 2, "tensors": [1]}, "_step_index": {"value": 3}})


def test_the_state_travels_beside_the_conditioning_and_reads_back_exactly() -> None:
    embeds = {"prompt_embeds": torch.randn(1, 5, 8)}
    handed = {**embeds, **state_tensors(_state())}
    assert set(conditioning_of(handed)) == {"prompt_embeds"}
    back = state_of(handed)
    assert (back.step, back.total, back.scheduler) == (3, 6, _state().scheduler)
    assert set(back.tensors) == {"latents", "scheduler.model_outputs.1"}
    assert all(t.dtype != torch.uint8 for t in back.tensors.values()), "the meta bytes are not a state tensor"


def _meta(payload: bytes) -> dict[str, torch.Tensor]:
    return {"state.latents": torch.zeros(1), META: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"prompt_embeds": torch.zeros(1)}, "carries no denoising state"),
        (_meta(b"{not json"), "unreadable"),
        (_meta(json.dumps({"step": 1, "total": 2, "scheduler": []}).encode()), "unreadable"),
        (_meta(b"x" * (MAX_META_BYTES + 1)), "at most"),
        ({META: torch.zeros(3)}, "JSON byte string"),
        ({META: torch.frombuffer(bytearray(b'{"step":1,"total":2,"scheduler":{}}'), dtype=torch.uint8)}, "no latents"),
    ],
)
def test_a_malformed_hand_off_is_refused_with_the_reason(inputs: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(SplitStateError, match=match):
        state_of(inputs)
