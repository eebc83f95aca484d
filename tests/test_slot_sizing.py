"""Slot sizes come from the model configs and the farm's limits, and fit what the stages really send."""

from __future__ import annotations

from pathlib import Path

import torch

from scheduler.core.keys import Stage
from scheduler.core.spec import SpecLimits
from workers.slot_sizing import slot_bytes_for
from workers.stages.encode import TextEncodeStage
from workers.transfer.packing import pack_tensors
from workers.transfer.slot_pool import Slot

LIMITS = SpecLimits(max_width=64, max_height=48, max_frames=17)


def test_sizes_grow_with_the_limits(tiny_model_dir: Path, tiny_i2v_model_dir: Path) -> None:
    small = slot_bytes_for(Stage.DECODE, [tiny_model_dir], LIMITS)
    big = slot_bytes_for(Stage.DECODE, [tiny_model_dir], SpecLimits(max_width=1280, max_height=720, max_frames=81))
    assert big == 16 * 21 * 90 * 160 * 4 + 256  # 720p latents, fp32
    assert small < big
    # An i2v model's encode payload adds the image features and the 20-channel condition.
    assert slot_bytes_for(Stage.ENCODE, [tiny_i2v_model_dir], LIMITS) > slot_bytes_for(
        Stage.ENCODE, [tiny_model_dir], LIMITS
    )


def test_real_encode_output_fits_the_computed_slot(tiny_model_dir: Path) -> None:
    need = slot_bytes_for(Stage.ENCODE, [tiny_model_dir], LIMITS)
    tensors = TextEncodeStage(tiny_model_dir).encode("a red fox", "blurry", guidance_scale=5.0)
    buffer = torch.zeros(need, dtype=torch.uint8)
    entries, _ = pack_tensors(tensors, Slot(index=0, ptr=buffer.data_ptr(), nbytes=need, _bytes=buffer))
    assert max(e.offset + e.nbytes for e in entries) <= need
