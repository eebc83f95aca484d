"""A split denoising loop's hand-off: the paused loop's `DenoiseState` as payload tensors, and back.

The first transform hop of a split route (``transform@high``, steps ``[0, K)``) hands the next one
(``transform@low``) the encode stage's tensors unchanged *plus* the loop's state after step K: the
latents, the scheduler's multistep tensors (``state.<name>``) and its scalars as JSON bytes in one uint8
tensor (``state.meta``). Only tensors cross a hand-off; the JSON is parsed with bounds, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from workers.stages.denoise_state import DenoiseState

STATE_PREFIX = "state."
META = "state.meta"
# The scheduler's scalars and list shapes are a few hundred bytes; anything far larger is not ours.
MAX_META_BYTES = 64 * 1024


class SplitStateError(ValueError):
    """The handed-on loop state is missing or malformed (the job fails with the reason; no retry fixes it)."""


def state_tensors(state: DenoiseState) -> dict[str, torch.Tensor]:
    """``state`` as payload tensors, beside (not instead of) the encode stage's conditioning tensors."""
    meta = json.dumps({"step": state.step, "total": state.total, "scheduler": state.scheduler}).encode()
    tensors = {STATE_PREFIX + name: tensor for name, tensor in state.tensors.items()}
    tensors[META] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
    return tensors


def conditioning_of(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encode stage's tensors in a hand-off, without the loop state."""
    return {name: tensor for name, tensor in inputs.items() if not name.startswith(STATE_PREFIX)}


def state_of(inputs: Mapping[str, torch.Tensor]) -> DenoiseState:
    """The loop state a previous transform hop handed on; ``SplitStateError`` when it is absent or malformed."""
    meta = inputs.get(META)
    if meta is None:
        raise SplitStateError("the hand-off from the previous transform hop carries no denoising state")
    if meta.dtype != torch.uint8 or meta.dim() != 1 or meta.numel() > MAX_META_BYTES:
        raise SplitStateError(f"{META} is not a JSON byte string of at most {MAX_META_BYTES} bytes")
    try:
        entry = json.loads(bytes(meta.cpu().numpy().tobytes()))
        step, total, scheduler = int(entry["step"]), int(entry["total"]), entry["scheduler"]
        if not isinstance(scheduler, dict):
            raise TypeError("scheduler state is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise SplitStateError(f"{META} is unreadable: {exc}") from None
    tensors = {
        name.removeprefix(STATE_PREFIX): tensor
        for name, tensor in inputs.items()
        if name.startswith(STATE_PREFIX) and name != META
    }
    if "latents" not in tensors:
        raise SplitStateError("the handed-on denoising state has no latents")
    return DenoiseState(step, total, tensors, scheduler)
