"""Tiny LoRAs for a Wan DiT, built here with random weights: the adapters the farm's LoRA tests load.

Two layouts of the same weights: ``diffusers`` (PEFT keys under ``transformer.``,
what ``WanLoraLoaderMixin.save_lora_weights`` writes) and ``wan`` (the original
Wan / ComfyUI layout under ``diffusion_model.`` with ``lora_down``/``lora_up``
and an ``alpha`` per layer, which diffusers converts on load). Alpha equals the
rank, so both layouts load as the very same adapter: a test can check the
conversion path frame for frame. The same seed always gives byte-identical files;
nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import save_file

from workers.models.loading import ModelDirError
from workers.models.tiny import TINY_TRANSFORMER

LoraLayout = Literal["diffusers", "wan"]
LORA_LAYOUTS: tuple[LoraLayout, ...] = get_args(LoraLayout)
# diffusers' default weight file name: `load_lora_weights(DIR)` finds it without a weight_name.
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
# Small enough that the tiny model's frames stay in range, large enough that they visibly change.
UP_GAIN = 0.5

_ATTENTION = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
# Each adapted layer of a Wan block: (diffusers name, original Wan name, input is ffn-wide, output is ffn-wide).
_TARGETS: tuple[tuple[str, str, bool, bool], ...] = (
    *((f"attn1.{d}", f"self_attn.{w}", False, False) for d, w in _ATTENTION),
    *((f"attn2.{d}", f"cross_attn.{w}", False, False) for d, w in _ATTENTION),
    ("ffn.net.0.proj", "ffn.0", False, True),
    ("ffn.net.2", "ffn.2", True, False),
)


def transformer_config(model_dir: Path | None) -> dict[str, object]:
    """The DiT config a LoRA is shaped for: ``model_dir``'s transformer, or the tiny model's."""
    if model_dir is None:
        return dict(TINY_TRANSFORMER)
    path = Path(model_dir) / "transformer" / "config.json"
    try:
        config: dict[str, object] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path}: cannot read the DiT config to shape a LoRA for ({exc})") from None
    return config


def tiny_lora_tensors(
    config: dict[str, object], *, rank: int = 4, seed: int = 0, layout: LoraLayout = "diffusers"
) -> dict[str, torch.Tensor]:
    """Random LoRA weights for every attention and feed-forward linear of the DiT ``config`` describes."""
    if rank < 1:
        raise ModelDirError(f"LoRA rank must be at least 1 (got {rank})")
    if layout not in LORA_LAYOUTS:
        raise ModelDirError(f"unknown LoRA layout {layout!r}: use one of {', '.join(LORA_LAYOUTS)}")
    inner = int(str(config["num_attention_heads"])) * int(str(config["attention_head_dim"]))
    ffn = int(str(config["ffn_dim"]))
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for block in range(int(str(config["num_layers"]))):
        for diffusers_name, wan_name, ffn_in, ffn_out in _TARGETS:
            fan_in, fan_out = (ffn if ffn_in else inner), (ffn if ffn_out else inner)
            down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            up = torch.randn(fan_out, rank, generator=generator) * (UP_GAIN / rank**0.5)
            if layout == "diffusers":
                stem = f"transformer.blocks.{block}.{diffusers_name}"
                tensors[f"{stem}.lora_A.weight"] = down
                tensors[f"{stem}.lora_B.weight"] = up
            else:
                stem = f"diffusion_model.blocks.{block}.{wan_name}"
                tensors[f"{stem}.lora_down.weight"] = down
                tensors[f"{stem}.lora_up.weight"] = up
                # alpha / rank is the forward scale: alpha = rank loads as exactly the diffusers weights.
                tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return tensors


def build_tiny_lora(
    out_dir: Path,
    *,
    model_dir: Path | None = None,
    rank: int = 4,
    seed: int = 0,
    layout: LoraLayout = "diffusers",
) -> Path:
    """Write a tiny LoRA file into ``out_dir`` (created if missing); returns the file's path."""
    tensors = tiny_lora_tensors(transformer_config(model_dir), rank=rank, seed=seed, layout=layout)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelDirError(f"{out_dir} is a file: give a directory for the LoRA")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LORA_FILE_NAME
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path
