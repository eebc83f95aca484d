"""A quantized DiT (``transform.quantize``, `workers.stages.dit_quantize`): its frames stay near the full-precision
ones, LoRAs still apply on top, and modes that cannot run are refused at start in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings, SettingsError, load_settings
from tests.test_stages_match_wanpipeline import denoise
from workers.models.tiny_lora import build_tiny_lora
from workers.stages.decode import StreamingVaeDecoder
from workers.stages.dit_quantize import QuantizeError, quantize_dit
from workers.stages.encode import TextEncodeStage
from workers.stages.lora_adapters import AdapterChoice, LoraAdapters
from workers.stages.transform import DenoiseStage

STAGE_TASK = "t2v"
SEED = 11
# Measured on the tiny model (CPU, 4 steps, CFG 5, torchao 0.18): int8 frames differ from the float32 ones
# by at most 7/255, PSNR 48.5 dB; the bounds leave room for other CPUs' int8 kernels.
MAX_INT8_FRAME_DIFF = 12
MIN_INT8_PSNR_DB = 40.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def frames(decoder: StreamingVaeDecoder, latents: torch.Tensor) -> np.ndarray:
    return np.concatenate(list(decoder.iter_frames(latents)))


@pytest.fixture(scope="module")
def int8_denoiser(tiny_model_dir: Path) -> DenoiseStage:
    stage = DenoiseStage(tiny_model_dir)
    quantize_dit(stage.transformer, "int8_dynamic")
    return stage


def test_int8_dynamic_frames_stay_within_the_stated_bound_of_float32(
    encoder: TextEncodeStage, decoder: StreamingVaeDecoder, denoiser: DenoiseStage, int8_denoiser: DenoiseStage
) -> None:
    full = frames(decoder, denoise(encoder, denoiser, seed=SEED))
    quantized = frames(decoder, denoise(encoder, int8_denoiser, seed=SEED))

    difference = int(np.abs(full.astype(np.int16) - quantized.astype(np.int16)).max())
    print(f"int8_dynamic vs float32: max abs diff {difference}/255, PSNR {psnr(quantized, full):.1f} dB")
    assert 0 < difference <= MAX_INT8_FRAME_DIFF  # it really quantized, and stayed close
    assert psnr(quantized, full) >= MIN_INT8_PSNR_DB


def test_a_lora_applies_on_top_of_the_quantized_dit(
    encoder: TextEncodeStage, decoder: StreamingVaeDecoder, int8_denoiser: DenoiseStage, tmp_path: Path
) -> None:
    import hashlib

    path = build_tiny_lora(tmp_path / "style", seed=1)
    adapters = LoraAdapters(int8_denoiser.transformer, capacity=1)
    style = AdapterChoice("style", hashlib.sha256(path.read_bytes()).hexdigest(), 1.0)
    adapters.ensure_loaded(style, path.read_bytes())
    base = denoise(encoder, int8_denoiser, seed=SEED)
    with adapters.activated([style]):
        styled = denoise(encoder, int8_denoiser, seed=SEED)

    assert np.abs(frames(decoder, styled).astype(np.int16) - frames(decoder, base).astype(np.int16)).max() > 8
    assert torch.equal(denoise(encoder, int8_denoiser, seed=SEED), base)  # off again after the job


def test_modes_that_cannot_run_here_are_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.stage_compute import load_stage_compute

    transformer = DenoiseStage(tiny_model_dir).transformer
    with pytest.raises(QuantizeError, match=r"^transform.quantize fp8_dynamic needs a GPU with fp8 tensor cores"):
        quantize_dit(transformer, "fp8_dynamic")
    with pytest.raises(QuantizeError, match="^transform.quantize 'int4' is not a mode: use one of none, int8"):
        quantize_dit(transformer, "int4")
    config = tmp_path / "farm.yaml"
    config.write_text("transform:\n  quantize: int4\n")
    with pytest.raises(SettingsError) as refused:
        load_settings(config, env={})
    assert "bad setting transform.quantize" in str(refused.value) and "\n" not in str(refused.value)
    parallel = FarmSettings.model_validate({"transform": {"quantize": "int8_dynamic", "context_parallel": 2}})
    with pytest.raises(ValueError, match="transform.quantize to none"):
        load_stage_compute(Stage.TRANSFORM, tiny_model_dir, parallel)
