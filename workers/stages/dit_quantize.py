"""A quantized DiT: torchao's ``quantize_`` applied once, at worker start, to the resident Wan transformer.

diffusers documents torchao as its quantization backend for the DiT (the same
configs ``TorchAoConfig`` names); applying ``quantize_`` to the loaded model
swaps each ``nn.Linear`` weight for a quantized tensor subclass, so the
denoising loop, step caches, batching and LoRAs (PEFT adds its low-rank
update beside the quantized base layer) run unchanged. Modes:

- ``int8_dynamic``: int8 weights, activations quantized per token at run time
  (``Int8DynamicActivationInt8WeightConfig``): about 2x per DiT call on the CPUs
  measured (bench.dit), relative output error near 1e-2;
- ``fp8_dynamic``: the same in float8 (``Float8DynamicActivationFloat8WeightConfig``),
  for GPUs with fp8 tensor cores (compute capability 8.9+); refused elsewhere;
- ``none``: nothing changes.

torchao is imported only here, and only for a mode other than ``none``.
"""

from __future__ import annotations

from typing import Any

import torch

QUANTIZE_MODES = ("none", "int8_dynamic", "fp8_dynamic")
# Hopper and Ada: the first GPUs with fp8 tensor cores.
FP8_MIN_CAPABILITY = (8, 9)


class QuantizeError(ValueError):
    """A quantize mode this worker cannot run; one line saying what to set instead."""


def quantize_dit(transformer: torch.nn.Module, mode: str) -> None:
    """Quantize ``transformer``'s linear layers in place for ``mode`` (``none``: leave it as loaded)."""
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"transform.quantize {mode!r} is not a mode: use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return
    device = next(transformer.parameters()).device
    if mode == "fp8_dynamic" and not _has_fp8_tensor_cores(device):
        raise QuantizeError(
            f"transform.quantize fp8_dynamic needs a GPU with fp8 tensor cores (compute capability 8.9+), not "
            f"{device}; use int8_dynamic here"
        )
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise QuantizeError(
            f"transform.quantize {mode} needs torchao: pip install torchao (or set transform.quantize: none)"
        ) from None
    quantize_(transformer, _config(mode))


def _config(mode: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig

    if mode == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return Float8DynamicActivationFloat8WeightConfig()


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY
