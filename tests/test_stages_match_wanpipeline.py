"""The disaggregated stages (encode -> denoise -> streaming decode) reproduce diffusers' WanPipeline exactly.

Also covers the tiny model directory (determinism, the CLI's refusals) and the
model-dir checks, all on CPU float32 with a tiny model built once per session.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest_models import TINY_MODEL_SEED
from workers.models.__main__ import main as models_cli
from workers.models.build import MARKER_FILE
from workers.models.loading import ModelDirError, check_model_dir, load_scheduler
from workers.models.tiny import build_tiny_model
from workers.stages import StageCancelled
from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
from workers.stages.encode import TextEncodeStage
from workers.stages.transform import DenoiseStage

PROMPT = "a red fox running through snow"
NEGATIVE_PROMPT = "blurry"
JOB: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 17,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
}
SEED = 42
# The shared stage fixtures (tests/stage_fixtures.py) serve the tiny t2v model here.
STAGE_TASK = "t2v"


def run_pipeline(pipe: Any, *, seed: int, output_type: str = "np", **overrides: Any) -> Any:
    job = {**JOB, **overrides}
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
        **job,
    ).frames


def denoise(encoder: TextEncodeStage, denoiser: DenoiseStage, *, seed: int, **kwargs: Any) -> torch.Tensor:
    job = {**JOB, **kwargs}
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, job["guidance_scale"])
    return denoiser.denoise(embeds, seed=seed, flow_shift=job.pop("flow_shift", None), **job)


@pytest.fixture(scope="module")
def latents(encoder: TextEncodeStage, denoiser: DenoiseStage) -> torch.Tensor:
    return denoise(encoder, denoiser, seed=SEED)


@pytest.fixture(scope="module")
def streamed_chunks(decoder: StreamingVaeDecoder, latents: torch.Tensor) -> list[np.ndarray]:
    return list(decoder.iter_frames(latents))


# --- the stages against WanPipeline ---------------------------------------------------------------


def test_streamed_frames_equal_wanpipeline_frames(pipeline: Any, streamed_chunks: list[np.ndarray]) -> None:
    expected = frames_to_uint8(run_pipeline(pipeline, seed=SEED)[0])
    frames = np.concatenate(streamed_chunks)

    assert frames.dtype == np.uint8
    assert frames.shape == expected.shape == (17, 64, 64, 3)
    difference = np.abs(frames.astype(np.int16) - expected.astype(np.int16)).max()
    assert difference <= 1, f"frames differ from WanPipeline's by up to {difference}/255"


def test_denoised_latents_equal_wanpipeline_latents_bit_for_bit(pipeline: Any, latents: torch.Tensor) -> None:
    expected = run_pipeline(pipeline, seed=SEED, output_type="latent")

    assert latents.dtype == torch.float32
    assert torch.equal(latents, expected)


def test_stream_yields_one_frame_then_four_per_latent_frame(
    decoder: StreamingVaeDecoder, latents: torch.Tensor, streamed_chunks: list[np.ndarray]
) -> None:
    assert latents.shape == (1, 16, 5, 8, 8)
    assert [len(chunk) for chunk in streamed_chunks] == [1, 4, 4, 4, 4]
    assert all(chunk.shape[1:] == (64, 64, 3) for chunk in streamed_chunks)
    assert decoder.frame_count(latents) == 17


def test_streaming_decode_equals_whole_video_vae_decode(
    decoder: StreamingVaeDecoder, latents: torch.Tensor, streamed_chunks: list[np.ndarray]
) -> None:
    with torch.no_grad():
        video = decoder.vae.decode(decoder.denormalize(latents), return_dict=False)[0]
    expected = frames_to_uint8(decoder.video_processor.postprocess_video(video, output_type="np")[0])

    np.testing.assert_array_equal(np.concatenate(streamed_chunks), expected)


def test_encode_equals_pipeline_encode_prompt(pipeline: Any, encoder: TextEncodeStage) -> None:
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, guidance_scale=5.0)
    with torch.no_grad():  # grad mode picks other kernels: compare like the pipeline runs
        expected, expected_negative = pipeline.encode_prompt(PROMPT, NEGATIVE_PROMPT, max_sequence_length=512)

    assert set(embeds) == {"prompt_embeds", "negative_prompt_embeds"}
    assert embeds["prompt_embeds"].shape == (1, 512, 32)
    assert torch.equal(embeds["prompt_embeds"], expected)
    assert torch.equal(embeds["negative_prompt_embeds"], expected_negative)


def test_encode_without_guidance_has_no_negative(encoder: TextEncodeStage) -> None:
    assert set(encoder.encode(PROMPT, NEGATIVE_PROMPT, guidance_scale=1.0)) == {"prompt_embeds"}


def test_denoise_without_guidance_equals_pipeline_latents(
    pipeline: Any, encoder: TextEncodeStage, denoiser: DenoiseStage
) -> None:
    ours = denoise(encoder, denoiser, seed=7, guidance_scale=1.0, num_inference_steps=2)
    expected = run_pipeline(pipeline, seed=7, output_type="latent", guidance_scale=1.0, num_inference_steps=2)

    assert torch.equal(ours, expected)


def test_flow_shift_override_equals_pipeline_with_that_scheduler(
    tiny_model_dir: Path,
    encoder: TextEncodeStage,
    denoiser: DenoiseStage,
) -> None:
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    shifted = WanPipeline.from_pretrained(
        tiny_model_dir, scheduler=load_scheduler(tiny_model_dir, flow_shift=5.0), local_files_only=True
    )
    shifted.set_progress_bar_config(disable=True)
    ours = denoise(encoder, denoiser, seed=SEED, flow_shift=5.0)

    assert shifted.scheduler.config["flow_shift"] == 5.0
    assert torch.equal(ours, run_pipeline(shifted, seed=SEED, output_type="latent"))
    assert not torch.equal(ours, denoise(encoder, denoiser, seed=SEED))


def test_different_seeds_give_different_frames(
    encoder: TextEncodeStage, denoiser: DenoiseStage, decoder: StreamingVaeDecoder, streamed_chunks: list[np.ndarray]
) -> None:
    other = np.concatenate(list(decoder.iter_frames(denoise(encoder, denoiser, seed=SEED + 1))))
    differing = np.mean(other != np.concatenate(streamed_chunks))

    assert differing > 0.5, f"only {differing:.1%} of pixel values changed with the seed"


def test_prompt_and_negative_prompt_change_the_frames(
    encoder: TextEncodeStage, denoiser: DenoiseStage, decoder: StreamingVaeDecoder, streamed_chunks: list[np.ndarray]
) -> None:
    # Guards the tiny model's use as a hand-off check: a lost or swapped embedding must show in the pixels.
    frames = np.concatenate(streamed_chunks)
    for prompt, negative in [("a blue cat sitting in the rain", NEGATIVE_PROMPT), (PROMPT, "")]:
        embeds = encoder.encode(prompt, negative, JOB["guidance_scale"])
        other_latents = denoiser.denoise(embeds, seed=SEED, flow_shift=None, **JOB)
        other = np.concatenate(list(decoder.iter_frames(other_latents)))
        assert np.mean(other != frames) > 0.1, f"{prompt!r} / {negative!r} barely changed the frames"


def test_denoise_reports_every_step(encoder: TextEncodeStage, denoiser: DenoiseStage) -> None:
    steps: list[tuple[int, int]] = []
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, 5.0)
    denoiser.denoise(embeds, seed=1, flow_shift=None, on_step=lambda i, n: steps.append((i, n)), **JOB)

    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_denoise_stops_at_a_step_boundary_when_asked(encoder: TextEncodeStage, denoiser: DenoiseStage) -> None:
    steps: list[int] = []
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, 5.0)

    with pytest.raises(StageCancelled, match="step 3 of 4"):
        denoiser.denoise(
            embeds,
            seed=1,
            flow_shift=None,
            on_step=lambda i, n: steps.append(i),
            should_stop=lambda: len(steps) == 2,
            **JOB,
        )
    assert steps == [1, 2]


@pytest.mark.parametrize(("field", "value"), [("num_frames", 16), ("height", 72), ("width", 40)])
def test_denoise_refuses_sizes_the_pipeline_would_round(
    encoder: TextEncodeStage, denoiser: DenoiseStage, field: str, value: int
) -> None:
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, 5.0)
    with pytest.raises(ValueError, match=str(value)):
        denoiser.denoise(embeds, seed=1, flow_shift=None, **{**JOB, field: value})


def test_denoise_needs_the_negative_embeds_when_guidance_is_on(denoiser: DenoiseStage) -> None:
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        denoiser.denoise({"prompt_embeds": torch.zeros(1, 512, 32)}, seed=1, flow_shift=None, **JOB)


# --- the tiny model directory ---------------------------------------------------------------------


def weight_files(model_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(model_dir)): path.read_bytes() for path in sorted(model_dir.rglob("*.safetensors"))}


def test_same_seed_builds_byte_identical_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = weight_files(build_tiny_model(tmp_path / "again", seed=TINY_MODEL_SEED))
    other_seed = weight_files(build_tiny_model(tmp_path / "other", seed=TINY_MODEL_SEED + 1))
    original = weight_files(tiny_model_dir)

    assert sorted(original) == [
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert again == original
    assert all(other_seed[name] != original[name] for name in original)


def test_build_leaves_no_staging_dirs(tiny_model_dir: Path) -> None:
    assert [path.name for path in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]


def test_check_model_dir_names_a_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelDirError, match=r"nowhere does not exist; .*python -m workers.models tiny") as raised:
        check_model_dir(missing, ["text_encoder"])
    assert "\n" not in str(raised.value)


@pytest.fixture
def model_without_vae(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "partial"))
    shutil.rmtree(copy / "vae")
    yield copy


def test_check_model_dir_names_a_missing_component(model_without_vae: Path) -> None:
    check_model_dir(model_without_vae, ["tokenizer", "text_encoder", "transformer", "scheduler"])
    with pytest.raises(ModelDirError, match=r"has no vae/ folder; .*python -m workers.models tiny"):
        check_model_dir(model_without_vae, ["text_encoder", "vae"])
    with pytest.raises(ModelDirError, match="vae/"):
        StreamingVaeDecoder(model_without_vae)


def test_check_model_dir_names_missing_weights(model_without_vae: Path) -> None:
    (model_without_vae / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"no \*\.safetensors .* in transformer/"):
        DenoiseStage(model_without_vae)


def test_tiny_cli_refuses_a_non_empty_foreign_dir(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    result = subprocess.run(
        [sys.executable, "-m", "workers.models", "tiny", str(foreign)], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: refusing to write a tiny t2v model into")
    assert result.stderr.count("\n") == 1
    assert sorted(path.name for path in foreign.iterdir()) == ["notes.txt"]


def test_tiny_cli_is_a_no_op_on_a_complete_model(
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = tiny_model_dir / MARKER_FILE
    before = marker.stat().st_mtime_ns

    assert models_cli(["tiny", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out == f"{tiny_model_dir}\n"
    assert marker.stat().st_mtime_ns == before


def test_tiny_cli_refuses_a_model_built_with_another_seed(
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert models_cli(["tiny", str(tiny_model_dir), "--seed", str(TINY_MODEL_SEED + 1)]) == 2
    assert "built with seed 0, not 1" in capsys.readouterr().err
