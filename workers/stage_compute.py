"""Loads the one model component a stage needs, once per worker process."""

from __future__ import annotations

from typing import Any

import torch

from scheduler.keys import Stage
from scheduler.settings import FarmSettings


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown worker dtype {name!r}: use one of {', '.join(dtypes)}")
    return dtypes[name]


def load_stage_compute(stage: Stage, settings: FarmSettings) -> Any:
    from workers.models.loading import check_model_dir

    device, dtype = settings.worker.device, torch_dtype(settings.worker.dtype)
    if stage is Stage.ENCODE:
        from workers.stages.encode import TextEncodeStage

        check_model_dir(settings.model_dir, ["text_encoder", "tokenizer"])
        return TextEncodeStage(settings.model_dir, device=device, dtype=dtype)
    if stage is Stage.TRANSFORM:
        from workers.stages.transform import DenoiseStage

        check_model_dir(settings.model_dir, ["transformer", "scheduler"])
        return DenoiseStage(settings.model_dir, device=device, dtype=dtype)
    from workers.stages.decode import StreamingVaeDecoder

    check_model_dir(settings.model_dir, ["vae"])
    return StreamingVaeDecoder(settings.model_dir, device=device, dtype=dtype)
