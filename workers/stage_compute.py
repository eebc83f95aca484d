"""Loads what a stage needs for each model it serves, once per worker process.

A worker may serve several models (say a t2v and an i2v checkpoint); each gets
its own compute object, keyed by the model name jobs use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scheduler.keys import Stage
from scheduler.settings import FarmSettings


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown worker dtype {name!r}: use one of {', '.join(dtypes)}")
    return dtypes[name]


@dataclass
class EncodeCompute:
    """The encode stage of one model: the text encoder, plus the image encoders for an i2v model."""

    task: str
    text: Any
    image: Any | None


def load_stage_compute(stage: Stage, model_dir: Path, settings: FarmSettings) -> Any:
    from workers.models.loading import check_model_dir, model_task

    device, dtype = settings.worker.device, torch_dtype(settings.worker.dtype)
    check_model_dir(model_dir, [])
    task = model_task(model_dir)
    if stage is Stage.ENCODE:
        from workers.stages.encode import TextEncodeStage

        check_model_dir(model_dir, ["text_encoder", "tokenizer"])
        image = None
        if task == "i2v":
            from workers.stages.image_encode import ImageConditionStage

            check_model_dir(model_dir, ["image_encoder", "image_processor", "vae"])
            image = ImageConditionStage(model_dir, device=device, dtype=dtype)
        return EncodeCompute(task, TextEncodeStage(model_dir, device=device, dtype=dtype), image)
    if stage is Stage.TRANSFORM:
        from workers.stages.transform import DenoiseStage

        check_model_dir(model_dir, ["transformer", "scheduler"])
        return DenoiseStage(model_dir, device=device, dtype=dtype)
    from workers.stages.decode import StreamingVaeDecoder

    check_model_dir(model_dir, ["vae"])
    return StreamingVaeDecoder(model_dir, device=device, dtype=dtype)


def load_all(stage: Stage, settings: FarmSettings) -> tuple[dict[str, Any], dict[str, str]]:
    """Compute objects and tasks for every model this worker serves."""
    from workers.models.loading import model_task

    computes: dict[str, Any] = {}
    tasks: dict[str, str] = {}
    for name, model_dir in settings.served_models().items():
        computes[name] = load_stage_compute(stage, model_dir, settings)
        tasks[name] = model_task(model_dir)
    return computes, tasks
