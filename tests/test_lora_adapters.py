"""LoRAs on the resident DiT (`workers.stages.lora_adapters`) against diffusers' WanPipeline with the same LoRAs.

The stage path (encode -> denoise with the job's adapters active -> streaming
decode) must give WanPipeline's frames after ``load_lora_weights`` and
``set_adapters`` with the same scales; a base job after a LoRA job must equal a
base job on a DiT that never saw a LoRA, bit for bit; a LoRA that does not fit
fails alone and leaves the DiT as it was. CPU float32, the tiny model, tiny
LoRAs built here (`workers.models.tiny_lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.test_stages_match_wanpipeline import denoise, run_pipeline
from workers.models.tiny import TINY_TRANSFORMER
from workers.models.tiny_lora import build_tiny_lora, tiny_lora_tensors
from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
from workers.stages.encode import TextEncodeStage
from workers.stages.lora_adapters import AdapterChoice, LoraAdapters, LoraLoadError
from workers.stages.transform import DenoiseStage

STAGE_TASK = "t2v"
SEED = 7


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "style": build_tiny_lora(root / "style", seed=1),
        "motion": build_tiny_lora(root / "motion", seed=2, rank=2),
        # The same weights as "style" in the original Wan layout, which diffusers converts on load.
        "style_wan": build_tiny_lora(root / "style-wan", seed=1, layout="wan"),
    }


@pytest.fixture(scope="module")
def lora_denoiser(tiny_model_dir: Path) -> DenoiseStage:
    """A DiT of its own: the LoRAs loaded here must not reach the session's shared stages."""
    return DenoiseStage(tiny_model_dir)


@pytest.fixture(scope="module")
def adapters(lora_denoiser: DenoiseStage) -> LoraAdapters:
    """One cache per DiT, as a worker has (capacity for every LoRA of this module)."""
    return LoraAdapters(lora_denoiser.transformer, capacity=4)


@pytest.fixture(scope="module")
def lora_pipeline(tiny_model_dir: Path) -> Any:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def choice(name: str, path: Path, scale: float) -> AdapterChoice:
    import hashlib

    return AdapterChoice(name, hashlib.sha256(path.read_bytes()).hexdigest(), scale)


def stage_latents(encoder: TextEncodeStage, denoiser: DenoiseStage) -> torch.Tensor:
    return denoise(encoder, denoiser, seed=SEED)


def pipeline_with_loras(pipe: Any, loras: dict[str, tuple[Path, float]], output_type: str = "np") -> Any:
    """WanPipeline's output with ``loras`` (name -> file, scale) loaded and set, then removed again."""
    for name, (path, _) in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(list(loras), [scale for _, scale in loras.values()])
    try:
        return run_pipeline(pipe, seed=SEED, output_type=output_type)
    finally:
        pipe.delete_adapters(list(loras))


def frames_of(decoder: StreamingVaeDecoder, latents: torch.Tensor) -> np.ndarray:
    return np.concatenate(list(decoder.iter_frames(latents)))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_one_lora_frames_equal_wanpipeline_with_the_lora(
    encoder: TextEncodeStage,
    decoder: StreamingVaeDecoder,
    lora_denoiser: DenoiseStage,
    adapters: LoraAdapters,
    lora_pipeline: Any,
    lora_files: dict[str, Path],
) -> None:
    style = choice("style", lora_files["style"], 0.8)
    adapters.ensure_loaded(style, lora_files["style"].read_bytes())
    base = stage_latents(encoder, lora_denoiser)  # loaded but not active: still the base model
    with adapters.activated([style]):
        latents = stage_latents(encoder, lora_denoiser)

    expected = pipeline_with_loras(lora_pipeline, {"style": (lora_files["style"], 0.8)})[0]
    expected_latents = pipeline_with_loras(lora_pipeline, {"style": (lora_files["style"], 0.8)}, "latent")

    assert torch.equal(latents, expected_latents)
    assert max_diff(frames_of(decoder, latents), frames_to_uint8(expected)) <= 1
    # The LoRA changed the video, so the comparison above could fail.
    assert max_diff(frames_of(decoder, latents), frames_of(decoder, base)) > 8


def test_two_loras_at_different_scales_one_in_the_wan_layout_equal_wanpipeline(
    encoder: TextEncodeStage,
    decoder: StreamingVaeDecoder,
    lora_denoiser: DenoiseStage,
    adapters: LoraAdapters,
    lora_pipeline: Any,
    lora_files: dict[str, Path],
) -> None:
    chosen = [choice("style_wan", lora_files["style_wan"], 0.6), choice("motion", lora_files["motion"], 1.3)]
    for c in chosen:
        adapters.ensure_loaded(c, lora_files[c.name].read_bytes())
    with adapters.activated(chosen):
        latents = stage_latents(encoder, lora_denoiser)

    both = {"style_wan": (lora_files["style_wan"], 0.6), "motion": (lora_files["motion"], 1.3)}
    expected = frames_to_uint8(pipeline_with_loras(lora_pipeline, both)[0])

    assert max_diff(frames_of(decoder, latents), expected) <= 1


def test_wan_layout_loads_as_the_same_adapter_as_the_diffusers_layout(
    encoder: TextEncodeStage, lora_denoiser: DenoiseStage, adapters: LoraAdapters, lora_files: dict[str, Path]
) -> None:
    runs = []
    for name in ("style", "style_wan"):
        c = choice(name, lora_files[name], 1.0)
        adapters.ensure_loaded(c, lora_files[name].read_bytes())
        with adapters.activated([c]):
            runs.append(stage_latents(encoder, lora_denoiser))

    assert torch.equal(runs[0], runs[1])


def test_base_job_after_lora_jobs_equals_a_dit_that_never_saw_a_lora(
    encoder: TextEncodeStage,
    tiny_model_dir: Path,
    lora_denoiser: DenoiseStage,
    adapters: LoraAdapters,
    lora_files: dict[str, Path],
) -> None:
    style = choice("style", lora_files["style"], 1.0)
    adapters.ensure_loaded(style, lora_files["style"].read_bytes())
    with adapters.activated([style]):
        stage_latents(encoder, lora_denoiser)
    after = stage_latents(encoder, lora_denoiser)

    fresh = stage_latents(encoder, DenoiseStage(tiny_model_dir))
    assert torch.equal(after, fresh)


def test_the_cache_keeps_the_most_recently_used_adapters_and_deletes_the_rest(
    tiny_model_dir: Path, lora_files: dict[str, Path]
) -> None:
    transformer = DenoiseStage(tiny_model_dir).transformer
    adapters = LoraAdapters(transformer, capacity=2)
    style, motion, wan = (choice(n, lora_files[n], 1.0) for n in ("style", "motion", "style_wan"))
    adapters.ensure_loaded(style, lora_files["style"].read_bytes())
    adapters.ensure_loaded(motion, lora_files["motion"].read_bytes())
    assert adapters.ensure_loaded(style, None) is False  # a hit: no bytes needed, now most recent
    adapters.ensure_loaded(wan, lora_files["style_wan"].read_bytes())

    assert adapters.loaded == [style.adapter_name, wan.adapter_name]
    assert set(transformer.peft_config) == {style.adapter_name, wan.adapter_name}
    assert (adapters.loads, adapters.evictions) == (3, 1)
    with pytest.raises(LoraLoadError, match="motion: not loaded"):
        with adapters.activated([motion]):
            pass


def test_a_lora_for_another_dit_or_not_a_lora_fails_alone_and_leaves_the_dit_as_it_was(
    encoder: TextEncodeStage, tiny_model_dir: Path
) -> None:
    from safetensors.torch import save

    denoiser = DenoiseStage(tiny_model_dir)
    before = stage_latents(encoder, denoiser)
    adapters = LoraAdapters(denoiser.transformer, capacity=2)
    wider = save(tiny_lora_tensors({**TINY_TRANSFORMER, "attention_head_dim": 16}, seed=3))

    with pytest.raises(
        LoraLoadError,
        match=r"^LoRA wide: does not fit this model's DiT \(size mismatch .*\); use a LoRA trained for it$",
    ):
        adapters.ensure_loaded(AdapterChoice("wide", "ab" * 32, 1.0), wider)
    with pytest.raises(LoraLoadError, match="^LoRA junk: not a (readable )?safetensors file"):
        adapters.ensure_loaded(AdapterChoice("junk", "cd" * 32, 1.0), b"\x00" * 8 + b"not json")
    not_lora = save({"blocks.0.weight": torch.zeros(2, 2)})
    with pytest.raises(LoraLoadError, match="^LoRA plain: "):
        adapters.ensure_loaded(AdapterChoice("plain", "ef" * 32, 1.0), not_lora)

    assert adapters.loaded == []
    assert not (getattr(denoiser.transformer, "peft_config", None) or {})
    assert torch.equal(stage_latents(encoder, denoiser), before)
