"""Wan2.2-TI2V: the farm's stages (encode -> denoise -> streaming decode) equal diffusers' pipelines exactly.

``tiny-ti2v`` against ``WanPipeline`` (expand_timesteps, per-token timesteps of ones) and
``tiny-ti2v-i2v`` against ``WanImageToVideoPipeline`` (expand_timesteps: the image VAE-encoded as
latent frame 0, kept fixed, timestep 0 on its tokens; no CLIP), same directory and seed, CPU
float32, one-pass guidance off: uint8 frames differ by 0. Also the per-token rules on their own,
the 32-pixel size grid, and which TI2V variants `model_task` refuses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from workers.models.loading import ModelDirError, model_task
from workers.models.ti2v import VaeCompression, expands_timesteps, vae_compression
from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
from workers.stages.encode import TextEncodeStage
from workers.stages.first_frame_encode import FirstFrameLatentStage
from workers.stages.ti2v import ExpandedTimesteps
from workers.stages.transform import DenoiseStage

PROMPT = "a red fox running through snow"
NEGATIVE_PROMPT = "blurry"
# 64x96: multiples of 32 (16x VAE x patch 2), not square, so height and width cannot be swapped unseen.
JOB: dict[str, Any] = {"height": 64, "width": 96, "num_frames": 17, "num_inference_steps": 4, "guidance_scale": 5.0}
SEED = 42


def noise_image(seed: int, size: tuple[int, int] = (90, 60)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


IMAGE = noise_image(1)


def pipeline_frames(model_dir: Path, image: PIL.Image.Image | None = None) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipeline_class = WanPipeline if image is None else WanImageToVideoPipeline
    pipe = pipeline_class.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if image is None else {"image": image}
    frames = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        **JOB,
        **extra,
    ).frames[0]
    return frames_to_uint8(frames)


def stage_frames(model_dir: Path, image: PIL.Image.Image | None = None) -> tuple[np.ndarray, list[int], torch.Tensor]:
    embeds = TextEncodeStage(model_dir).encode(PROMPT, NEGATIVE_PROMPT, JOB["guidance_scale"])
    if image is not None:
        size = {key: JOB[key] for key in ("height", "width", "num_frames")}
        embeds.update(FirstFrameLatentStage(model_dir).encode(image, **size))
    latents = DenoiseStage(model_dir).denoise(embeds, seed=SEED, flow_shift=None, **JOB)
    chunks = list(StreamingVaeDecoder(model_dir).iter_frames(latents))
    return np.concatenate(chunks), [len(chunk) for chunk in chunks], latents


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --- the stages against the pipelines ----------------------------------------------------------------------


def test_t2v_stages_equal_wanpipeline_with_expanded_timesteps(tiny_ti2v_model_dir: Path) -> None:
    frames, chunk_sizes, latents = stage_frames(tiny_ti2v_model_dir)
    expected = pipeline_frames(tiny_ti2v_model_dir)

    # 48 latent channels at 16x: 64x96 pixels are 4x6 latents; 17 frames are 5 latent frames.
    assert tuple(latents.shape) == (1, 48, 5, 4, 6)
    assert chunk_sizes == [1, 4, 4, 4, 4]  # streamed one latent frame at a time, as for Wan2.1
    assert frames.shape == expected.shape == (17, 64, 96, 3)
    assert max_difference(frames, expected) == 0


def test_i2v_stages_equal_wanimagetovideopipeline_with_expanded_timesteps(tiny_ti2v_i2v_model_dir: Path) -> None:
    frames, _, latents = stage_frames(tiny_ti2v_i2v_model_dir, IMAGE)
    expected = pipeline_frames(tiny_ti2v_i2v_model_dir, IMAGE)

    assert frames.shape == expected.shape == (17, 64, 96, 3)
    assert max_difference(frames, expected) == 0
    # The image is in the video: latent frame 0 is the image's latents, not denoised noise.
    condition = FirstFrameLatentStage(tiny_ti2v_i2v_model_dir).encode(IMAGE, height=64, width=96, num_frames=17)
    assert torch.equal(latents[:, :, :1], condition["condition"])


def test_the_first_frame_condition_is_the_vae_mode_of_the_resized_image(tiny_ti2v_i2v_model_dir: Path) -> None:
    stage = FirstFrameLatentStage(tiny_ti2v_i2v_model_dir)
    condition = stage.encode(IMAGE, height=64, width=96, num_frames=17)["condition"]

    assert condition.dtype == torch.float32 and tuple(condition.shape) == (1, 48, 1, 4, 6)
    # No randomness: encoding twice gives the same tensor, and another image another one.
    assert torch.equal(condition, stage.encode(IMAGE, height=64, width=96, num_frames=17)["condition"])
    assert not torch.equal(condition, stage.encode(noise_image(2), height=64, width=96, num_frames=17)["condition"])


# --- the per-token rules -----------------------------------------------------------------------------------


def test_per_token_timesteps_are_t_except_on_the_condition_frame() -> None:
    latents = torch.zeros(1, 48, 3, 4, 6)
    t = torch.tensor(900)
    t2v = ExpandedTimesteps.for_job(latents, None, (1, 2, 2))
    i2v = ExpandedTimesteps.for_job(latents, torch.ones(1, 48, 1, 4, 6), (1, 2, 2))

    # One per DiT token: 3 frames x (4 / 2) x (6 / 2) = 18, per batch row.
    assert t2v.timestep(t, 2).shape == (2, 18)
    assert torch.equal(t2v.timestep(t, 1), torch.full((1, 18), 900.0))
    assert torch.equal(i2v.timestep(t, 1)[0, :6], torch.zeros(6))  # frame 0's 2 x 3 tokens
    assert torch.equal(i2v.timestep(t, 1)[0, 6:], torch.full((12,), 900.0))
    # The DiT sees the condition on frame 0, the latents elsewhere; the final latents keep the condition.
    noisy = torch.full((1, 48, 3, 4, 6), 7.0)
    blended = i2v.model_input(noisy, torch.float32)
    assert torch.equal(blended[:, :, 0], torch.ones(1, 48, 4, 6)) and torch.equal(blended[:, :, 1:], noisy[:, :, 1:])
    assert torch.equal(i2v.finish(noisy), blended)
    assert torch.equal(t2v.finish(noisy), noisy)


def test_a_condition_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"condition is shaped \[1, 48, 1, 2, 3\] but this job's latents need"):
        ExpandedTimesteps.for_job(torch.zeros(1, 48, 3, 4, 6), torch.zeros(1, 48, 1, 2, 3), (1, 2, 2))


def test_latent_sizes_come_from_the_vae_config(tiny_ti2v_model_dir: Path, tiny_model_dir: Path) -> None:
    assert vae_compression(tiny_ti2v_model_dir) == VaeCompression(spatial=16, temporal=4)
    assert vae_compression(tiny_model_dir) == VaeCompression(spatial=8, temporal=4)
    assert expands_timesteps(tiny_ti2v_model_dir) and not expands_timesteps(tiny_model_dir)


def test_sizes_off_the_32_pixel_grid_are_refused(tiny_ti2v_model_dir: Path) -> None:
    denoiser = DenoiseStage(tiny_ti2v_model_dir)
    # 48 is a multiple of 16 (fine for Wan2.1) but not of 32 (16x VAE x patch 2).
    with pytest.raises(ValueError, match=r"height and width must be positive multiples of 32x32 \(got 48x64\)"):
        denoiser.initial_latents(height=48, width=64, num_frames=17, seed=0)


def test_a_ti2v_dit_refuses_clip_features(tiny_ti2v_i2v_model_dir: Path) -> None:
    denoiser = DenoiseStage(tiny_ti2v_i2v_model_dir)
    embeds = {"prompt_embeds": torch.zeros(1, 512, 32), "image_embeds": torch.zeros(1, 17, 32)}
    with pytest.raises(ValueError, match="Wan2.2-TI2V model, which takes no image_embeds"):
        denoiser.denoise(embeds, seed=0, flow_shift=None, **{**JOB, "guidance_scale": 1.0})


def test_a_ti2v_i2v_loop_resumes_bit_exactly_and_runs_alone_in_a_batching_worker(
    tiny_ti2v_i2v_model_dir: Path,
) -> None:
    """A split route / preemption resumes from a mid-loop state; a batching DiT runs a TI2V job on its own."""
    from workers.stages.denoise_state import DenoiseState

    embeds = TextEncodeStage(tiny_ti2v_i2v_model_dir).encode(PROMPT, NEGATIVE_PROMPT, JOB["guidance_scale"])
    embeds.update(FirstFrameLatentStage(tiny_ti2v_i2v_model_dir).encode(IMAGE, height=64, width=96, num_frames=17))
    denoiser = DenoiseStage(tiny_ti2v_i2v_model_dir)
    saved: list[DenoiseState] = []

    def keep_step_2(done: int, total: int, capture: Any) -> None:
        if done == 2:
            saved.append(capture())

    whole = denoiser.denoise(embeds, seed=SEED, flow_shift=None, at_boundary=keep_step_2, **JOB)
    resumed = denoiser.denoise(embeds, seed=SEED, flow_shift=None, resume=saved[0], **JOB)
    assert torch.equal(whole, resumed)
    batching = DenoiseStage(tiny_ti2v_i2v_model_dir, batch_jobs=True)
    assert torch.equal(batching.denoise(embeds, seed=SEED, flow_shift=None, **JOB), whole)


# --- model directories -------------------------------------------------------------------------------------


def test_model_task_reads_ti2v_dirs(tiny_ti2v_model_dir: Path, tiny_ti2v_i2v_model_dir: Path) -> None:
    assert model_task(tiny_ti2v_model_dir) == "t2v"
    assert model_task(tiny_ti2v_i2v_model_dir) == "i2v"


def _with_index(model_dir: Path, tmp_path: Path, **changes: Any) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, **changes}))
    return copy


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"transformer_2": ["diffusers", "WanTransformer3DModel"]}, "transformer_2"),
        ({"image_encoder": ["transformers", "CLIPVisionModel"]}, "sets expand_timesteps with an image_encoder"),
    ],
)
def test_unimplemented_ti2v_variants_are_refused_in_one_line(
    tiny_ti2v_i2v_model_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelDirError, match=message) as refused:
        model_task(_with_index(tiny_ti2v_i2v_model_dir, tmp_path, **changes))
    assert "\n" not in str(refused.value)


# --- sharded decode ----------------------------------------------------------------------------------------


def test_the_wan22_decoders_halo_comes_from_its_layers() -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from workers.models.presets import arch_named
    from workers.stages.sharded_decode import crop_points, decoder_halo

    with torch.device("meta"):  # the architecture only: no weights allocated
        real = AutoencoderKLWan(**arch_named("wan2.2-ti2v-5b").vae)
        tiny = AutoencoderKLWan(**arch_named("tiny-ti2v").vae)
    # Its 8x decoder (then 2x2 patches) has Wan2.1's conv stack per level, so the same reach: 15 latent pixels
    # with 2 residual blocks per level, 11 with the tiny one's 1.
    assert (decoder_halo(real.decoder), decoder_halo(tiny.decoder)) == (15, 11)
    # Whole residual up blocks are the crop points (their DupUp3D shortcut reads the block's input).
    assert crop_points(real.decoder)[-4:] == list(real.decoder.up_blocks)


@pytest.mark.integration
def test_sharded_decode_of_the_wan22_vae_equals_one_process(tiny_ti2v_model_dir: Path) -> None:
    """2x1 ranks over [1, 48, 2, 24, 8] latents: each 12-row core keeps an 11-row halo on its cut side only."""
    from workers.decode_group import DecodeRankGroup
    from workers.stages.sharded_decode import ShardGrid

    latents = torch.randn(1, 48, 2, 24, 8, generator=torch.Generator().manual_seed(0))
    single = StreamingVaeDecoder(tiny_ti2v_model_dir)
    expected = list(single.decoder_steps(single.vae.post_quant_conv(single.denormalize(latents))))
    group = DecodeRankGroup(tiny_ti2v_model_dir, ShardGrid.parse("2x1"), timeout_seconds=120)
    sharded = group.start(StreamingVaeDecoder(tiny_ti2v_model_dir))
    try:
        floats = list(sharded.decode_chunks(latents))
        frames = list(sharded.iter_frames(latents))
    finally:
        group.close()

    assert sharded.halo == 11
    # Decoder output: 12 channels (3 x 2 x 2 patches) at 8x; frames: unpatchified to 16x.
    assert [c.shape for c in floats] == [c.shape for c in expected] == [(1, 12, n, 192, 64) for n in (1, 4)]
    # Float reassociation only (see tests/test_sharded_decode.py for the tolerance's derivation).
    assert max(float((got - want).abs().max()) for got, want in zip(floats, expected, strict=True)) < 1e-4
    for got, want in zip(frames, expected, strict=True):
        assert got.shape == (want.shape[2], 384, 128, 3)
        assert int(np.abs(got.astype(np.int16) - single.to_frames(want).astype(np.int16)).max()) <= 1
