"""The one-process reference: what diffusers' Wan pipelines render for a farm job spec, as uint8 frames."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def reference_frames(
    model_dir: Path, spec: dict[str, Any], image: Any = None, loras: Mapping[str, tuple[Path, float]] | None = None
) -> np.ndarray:
    """WanPipeline (or WanImageToVideoPipeline when ``image`` is given) with the spec's seed, in uint8.

    ``loras`` (name -> file, scale): loaded with ``load_lora_weights`` and set with ``set_adapters`` first.
    """
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipeline_class = WanPipeline if image is None else WanImageToVideoPipeline
    pipe = pipeline_class.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    for name, (path, _) in (loras or {}).items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    if loras:
        pipe.set_adapters(list(loras), [scale for _, scale in loras.values()])
    extra: dict[str, Any] = {} if image is None else {"image": image}
    if spec.get("guidance_scale_2") is not None:
        extra["guidance_scale_2"] = spec["guidance_scale_2"]
    out = pipe(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        height=spec["height"],
        width=spec["width"],
        num_frames=spec["frames"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(spec["seed"]),
        output_type="np",
        **extra,
    ).frames[0]
    return np.round(np.asarray(out) * 255).astype(np.uint8)
