"""Image-to-video: text encode + image condition -> denoise -> streaming decode equals WanImageToVideoPipeline.

Also covers the i2v tensors themselves against the pipeline's own steps
(``encode_image``, ``prepare_latents``: condition and RNG order), the resize
policies, the DiT's refusals of mismatched inputs, task detection, and the
tiny i2v model directory. CPU float32 with a tiny model built once per session.
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

from tests.conftest_models import TINY_MODEL_SEED
from workers.models.__main__ import main as models_cli
from workers.models.build import MARKER_FILE
from workers.models.loading import ModelDirError, check_model_dir, load_image_encoder, model_task
from workers.models.tiny import build_tiny_model
from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
from workers.stages.encode import TextEncodeStage
from workers.stages.image_encode import ImageConditionStage, crop_to_aspect_ratio, prepare_condition_image
from workers.stages.payloads import transform_input_names
from workers.stages.transform import DenoiseStage

PROMPT = "a red fox running through snow"
NEGATIVE_PROMPT = "blurry"
JOB: dict[str, Any] = {
    "height": 48,
    "width": 64,
    "num_frames": 17,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
}
SIZE = {key: JOB[key] for key in ("height", "width", "num_frames")}
SEED = 42
# The shared stage fixtures (tests/stage_fixtures.py) serve the tiny i2v model here.
STAGE_TASK = "i2v"


def noise_image(seed: int, size: tuple[int, int] = (90, 60)) -> PIL.Image.Image:
    """A random RGB image, 3:2 by default, so reaching the job's 4:3 takes a real resize (or crop)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


IMAGE = noise_image(1)


def run_pipeline(pipe: Any, image: PIL.Image.Image, *, seed: int, output_type: str = "np") -> Any:
    return pipe(
        image=image,
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
        **JOB,
    ).frames


def encode(
    encoder: TextEncodeStage, image_stage: ImageConditionStage, image: PIL.Image.Image
) -> dict[str, torch.Tensor]:
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, JOB["guidance_scale"])
    embeds.update(image_stage.encode(image, **SIZE))
    return embeds


def render(denoiser: DenoiseStage, decoder: StreamingVaeDecoder, embeds: dict[str, torch.Tensor]) -> np.ndarray:
    latents = denoiser.denoise(embeds, seed=SEED, flow_shift=None, **JOB)
    return np.concatenate(list(decoder.iter_frames(latents)))


@pytest.fixture(scope="module")
def embeds(encoder: TextEncodeStage, image_stage: ImageConditionStage) -> dict[str, torch.Tensor]:
    return encode(encoder, image_stage, IMAGE)


@pytest.fixture(scope="module")
def other_embeds(encoder: TextEncodeStage, image_stage: ImageConditionStage) -> dict[str, torch.Tensor]:
    return encode(encoder, image_stage, noise_image(2))


@pytest.fixture(scope="module")
def latents(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    return denoiser.denoise(embeds, seed=SEED, flow_shift=None, **JOB)


@pytest.fixture(scope="module")
def frames(decoder: StreamingVaeDecoder, latents: torch.Tensor) -> np.ndarray:
    return np.concatenate(list(decoder.iter_frames(latents)))


# --- the stages against WanImageToVideoPipeline ---------------------------------------------------


def test_streamed_frames_equal_pipeline_frames(pipeline: Any, frames: np.ndarray) -> None:
    expected = frames_to_uint8(run_pipeline(pipeline, IMAGE, seed=SEED)[0])

    assert frames.dtype == np.uint8
    assert frames.shape == expected.shape == (17, 48, 64, 3)
    difference = np.abs(frames.astype(np.int16) - expected.astype(np.int16)).max()
    assert difference <= 1, f"frames differ from WanImageToVideoPipeline's by up to {difference}/255"


def test_denoised_latents_equal_pipeline_latents_bit_for_bit(pipeline: Any, latents: torch.Tensor) -> None:
    expected = run_pipeline(pipeline, IMAGE, seed=SEED, output_type="latent")

    assert latents.dtype == torch.float32
    assert latents.shape == (1, 16, 5, 6, 8)
    assert torch.equal(latents, expected)


def test_one_pass_guidance_equals_two_passes_within_tolerance(
    tiny_i2v_model_dir: Path,
    decoder: StreamingVaeDecoder,
    embeds: dict[str, torch.Tensor],
    latents: torch.Tensor,
    frames: np.ndarray,
) -> None:
    # Both halves of the batch carry the image condition and CLIP features (tests/test_dit_speed.py: t2v).
    one_pass = DenoiseStage(tiny_i2v_model_dir, one_pass_guidance=True).denoise(
        embeds, seed=SEED, flow_shift=None, **JOB
    )

    assert float((one_pass - latents).abs().max()) <= 1e-4
    assert not torch.equal(one_pass, latents)
    one_pass_frames = np.concatenate(list(decoder.iter_frames(one_pass)))
    assert np.abs(one_pass_frames.astype(np.int16) - frames.astype(np.int16)).max() <= 1


def test_denoise_without_guidance_equals_pipeline_latents(
    pipeline: Any, encoder: TextEncodeStage, image_stage: ImageConditionStage, denoiser: DenoiseStage
) -> None:
    job = {**JOB, "guidance_scale": 1.0, "num_inference_steps": 2, "height": 64, "width": 32, "num_frames": 9}
    size = {key: job[key] for key in ("height", "width", "num_frames")}
    embeds = encoder.encode(PROMPT, NEGATIVE_PROMPT, job["guidance_scale"])
    embeds.update(image_stage.encode(IMAGE, **size))
    expected = pipeline(
        image=IMAGE,
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="latent",
        **job,
    ).frames

    assert set(embeds) == {"prompt_embeds", "image_embeds", "condition"}
    assert torch.equal(denoiser.denoise(embeds, seed=7, flow_shift=None, **job), expected)


def test_image_tensors_equal_the_pipeline_steps(
    pipeline: Any, denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]
) -> None:
    # The pipeline's own step 5: noise first, then the condition, from one generator.
    generator = torch.Generator("cpu").manual_seed(SEED)
    pixels = pipeline.video_processor.preprocess(IMAGE, height=JOB["height"], width=JOB["width"]).to(torch.float32)
    with torch.no_grad():
        expected_embeds = pipeline.encode_image(IMAGE, torch.device("cpu"))
        noise, condition = pipeline.prepare_latents(
            pixels, 1, 16, JOB["height"], JOB["width"], JOB["num_frames"], torch.float32, torch.device("cpu"), generator
        )

    assert set(embeds) == set(transform_input_names("i2v", JOB["guidance_scale"]))
    assert embeds["image_embeds"].shape == (1, 17, 32) and embeds["image_embeds"].dtype == torch.float32
    assert embeds["condition"].shape == (1, 20, 5, 6, 8) and embeds["condition"].dtype == torch.float32
    assert torch.equal(embeds["image_embeds"], expected_embeds)
    assert torch.equal(embeds["condition"], condition)
    # Drawing the noise alone from the seed gives the pipeline's noise: the VAE encode draws nothing.
    assert torch.equal(denoiser.initial_latents(seed=SEED, **SIZE), noise)


def test_image_encode_draws_no_random_numbers(image_stage: ImageConditionStage) -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    image_stage.encode(IMAGE, height=48, width=64, num_frames=5)

    assert torch.equal(torch.get_rng_state(), state)


def test_a_different_image_changes_the_frames(
    denoiser: DenoiseStage, decoder: StreamingVaeDecoder, other_embeds: dict[str, torch.Tensor], frames: np.ndarray
) -> None:
    differing = np.mean(render(denoiser, decoder, other_embeds) != frames)

    assert differing > 0.5, f"only {differing:.1%} of pixel values changed with the image"


@pytest.mark.parametrize("name", ["image_embeds", "condition"])
def test_each_image_tensor_alone_changes_the_frames(
    denoiser: DenoiseStage,
    decoder: StreamingVaeDecoder,
    embeds: dict[str, torch.Tensor],
    other_embeds: dict[str, torch.Tensor],
    frames: np.ndarray,
    name: str,
) -> None:
    # Guards the tiny model's use as a hand-off check: a lost or swapped image tensor must
    # move the pixels well past the one-step rounding tolerance, not just flip a few.
    swapped = render(denoiser, decoder, {**embeds, name: other_embeds[name]})
    mean_change = np.abs(swapped.astype(np.int16) - frames.astype(np.int16)).mean()

    assert mean_change > 2.0, f"swapping {name} moved the pixels by only {mean_change:.2f}/255 on average"


def test_non_rgb_images_are_converted_first(image_stage: ImageConditionStage, embeds: dict[str, torch.Tensor]) -> None:
    rgba = IMAGE.convert("RGBA")
    encoded = image_stage.encode(rgba, **SIZE)

    assert torch.equal(encoded["condition"], embeds["condition"])
    assert torch.equal(encoded["image_embeds"], embeds["image_embeds"])


# --- resize policies ------------------------------------------------------------------------------


def banded_image() -> PIL.Image.Image:
    """120x60 (2:1): a 4:3 blue centre (80 px wide) between red bands 20 px wide."""
    pixels = np.zeros((60, 120, 3), dtype=np.uint8)
    pixels[:, :20] = pixels[:, 100:] = (255, 0, 0)
    pixels[:, 20:100] = (0, 0, 255)
    return PIL.Image.fromarray(pixels)


def test_resize_policy_is_the_pipeline_preprocess(pipeline: Any) -> None:
    expected = pipeline.video_processor.preprocess(IMAGE, height=48, width=64)

    assert torch.equal(prepare_condition_image(IMAGE, 48, 64, "resize"), expected)


def test_center_crop_policy_crops_to_the_aspect_ratio_then_resizes() -> None:
    stretched = prepare_condition_image(banded_image(), 48, 64, "resize")
    cropped = prepare_condition_image(banded_image(), 48, 64, "center_crop")

    assert cropped.shape == stretched.shape == (1, 3, 48, 64)
    assert cropped.dtype == torch.float32
    red = cropped[0, 0]
    assert float(red.max()) < -0.9, "red side bands survived the centre crop"
    assert float(stretched[0, 0, :, :4].min()) > 0.9, "the stretched image lost its red side bands"


@pytest.mark.parametrize(
    ("size", "box_size"),
    [((120, 60), (80, 60)), ((60, 90), (60, 45)), ((64, 48), (64, 48)), ((1000, 10), (13, 10))],
)
def test_crop_to_aspect_ratio_sizes(size: tuple[int, int], box_size: tuple[int, int]) -> None:
    image = noise_image(4, size)
    cropped = crop_to_aspect_ratio(image, 48, 64)

    assert cropped.size == box_size
    if box_size == size:
        assert cropped is image


def test_center_crop_feeds_both_encoders_the_cropped_image(image_stage: ImageConditionStage) -> None:
    image = banded_image()
    cropped = image_stage.encode(image, height=48, width=64, num_frames=5, policy="center_crop")
    by_hand = image_stage.encode(crop_to_aspect_ratio(image, 48, 64), height=48, width=64, num_frames=5)

    assert torch.equal(cropped["condition"], by_hand["condition"])
    assert torch.equal(cropped["image_embeds"], by_hand["image_embeds"])


def test_unknown_policy_and_bad_sizes_are_refused(image_stage: ImageConditionStage) -> None:
    with pytest.raises(ValueError, match="unknown resize policy 'stretch'"):
        prepare_condition_image(IMAGE, 48, 64, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiples of 8"):
        prepare_condition_image(IMAGE, 50, 64)
    with pytest.raises(ValueError, match=r"multiples of 16x16 \(got 40x64\)"):
        image_stage.encode(IMAGE, height=40, width=64, num_frames=17)
    with pytest.raises(ValueError, match="num_frames must be 1 \\+ 4k"):
        image_stage.encode(IMAGE, height=48, width=64, num_frames=16)


# --- the DiT's input checks -----------------------------------------------------------------------


def test_i2v_denoiser_needs_the_image_tensors(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> None:
    text_only = {name: embeds[name] for name in ("prompt_embeds", "negative_prompt_embeds")}
    with pytest.raises(ValueError, match="image-to-video model and needs image_embeds, condition"):
        denoiser.denoise(text_only, seed=1, flow_shift=None, **JOB)


def test_t2v_denoiser_refuses_image_tensors(tiny_model_dir: Path, embeds: dict[str, torch.Tensor]) -> None:
    t2v = DenoiseStage(tiny_model_dir)
    with pytest.raises(ValueError, match="text-to-video model but the job carries image_embeds, condition"):
        t2v.denoise(embeds, seed=1, flow_shift=None, **JOB)


def test_denoiser_refuses_a_condition_for_another_size(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"condition is shaped \[1, 20, 5, 6, 8\] but .* need \[1, 20, 5, 8, 8\]"):
        denoiser.denoise(embeds, seed=1, flow_shift=None, **{**JOB, "height": 64})


def test_denoiser_refuses_text_not_padded_to_512(denoiser: DenoiseStage, embeds: dict[str, torch.Tensor]) -> None:
    short = {**embeds, "prompt_embeds": embeds["prompt_embeds"][:, :226]}
    with pytest.raises(ValueError, match="prompt_embeds has 226 tokens; image-to-video needs them padded to 512"):
        denoiser.denoise(short, seed=1, flow_shift=None, **JOB)


def test_transform_input_names_per_task() -> None:
    assert transform_input_names("t2v", 5.0) == ("prompt_embeds", "negative_prompt_embeds")
    assert transform_input_names("t2v", 1.0) == ("prompt_embeds",)
    assert transform_input_names("i2v", 5.0) == ("prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition")
    assert transform_input_names("i2v", 1.0) == ("prompt_embeds", "image_embeds", "condition")


# --- task detection and the model directory -------------------------------------------------------


def test_model_task_reads_model_index(tiny_model_dir: Path, tiny_i2v_model_dir: Path) -> None:
    assert model_task(tiny_model_dir) == "t2v"
    assert model_task(tiny_i2v_model_dir) == "i2v"


def copy_index(model_dir: Path, tmp_path: Path, **changes: Any) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    index = json.loads((model_dir / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, **changes}))
    return copy


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"_class_name": "StableDiffusionPipeline"}, "names pipeline 'StableDiffusionPipeline', not WanPipeline or"),
        ({"boundary_ratio": 0.9}, "sets boundary_ratio but no transformer_2"),
        # A Wan2.1-I2V dir with per-token timesteps: TI2V conditions on the first latent frame, not on CLIP.
        ({"expand_timesteps": True}, "sets expand_timesteps with an image_encoder"),
    ],
)
def test_model_task_refuses_other_pipelines(
    tiny_i2v_model_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelDirError, match=message) as raised:
        model_task(copy_index(tiny_i2v_model_dir, tmp_path, **changes))
    assert "\n" not in str(raised.value)


def test_model_task_names_a_missing_index(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="has no model_index.json"):
        model_task(tmp_path)


def test_tiny_i2v_dir_has_the_wan21_i2v_layout(tiny_i2v_model_dir: Path) -> None:
    index = json.loads((tiny_i2v_model_dir / "model_index.json").read_text())
    transformer = json.loads((tiny_i2v_model_dir / "transformer" / "config.json").read_text())
    marker = json.loads((tiny_i2v_model_dir / MARKER_FILE).read_text())

    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    # The real checkpoint's name, whichever image-processor backend this install resolves it to.
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]
    assert (transformer["in_channels"], transformer["out_channels"]) == (36, 16)
    assert (transformer["image_dim"], transformer["added_kv_proj_dim"]) == (32, 24)
    assert marker == {"format": 1, "kind": "wan2.1-i2v-tiny", "seed": TINY_MODEL_SEED, "task": "i2v"}
    check_model_dir(tiny_i2v_model_dir, ["image_encoder", "image_processor"])


def test_load_image_encoder_names_a_missing_image_processor(tiny_i2v_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_i2v_model_dir, tmp_path / "partial"))
    (copy / "image_processor" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelDirError, match=r"missing image_processor/preprocessor_config.json"):
        load_image_encoder(copy, "cpu", torch.float32)


def weight_files(model_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(model_dir)): path.read_bytes() for path in sorted(model_dir.rglob("*.safetensors"))}


def test_same_seed_builds_byte_identical_i2v_weights(
    tiny_i2v_model_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    again = weight_files(build_tiny_model(tmp_path / "again", seed=TINY_MODEL_SEED, i2v=True))
    original = weight_files(tiny_i2v_model_dir)
    t2v = weight_files(tiny_model_dir)

    assert sorted(original) == [
        "image_encoder/model.safetensors",
        "text_encoder/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert again == original
    # One seed, one text encoder and VAE across tasks (Wan2.1's t2v and i2v share them too).
    assert original["vae/diffusion_pytorch_model.safetensors"] == t2v["vae/diffusion_pytorch_model.safetensors"]
    assert original["text_encoder/model.safetensors"] == t2v["text_encoder/model.safetensors"]


def test_tiny_cli_builds_i2v_and_will_not_mix_tasks(
    tiny_model_dir: Path, tiny_i2v_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert models_cli(["tiny", str(tiny_i2v_model_dir), "--i2v"]) == 0
    assert capsys.readouterr().out == f"{tiny_i2v_model_dir}\n"

    assert models_cli(["tiny", str(tiny_model_dir), "--i2v"]) == 2
    assert "holds a tiny t2v model, not tiny i2v" in capsys.readouterr().err
    assert models_cli(["tiny", str(tiny_i2v_model_dir)]) == 2
    assert "holds a tiny i2v model, not tiny t2v" in capsys.readouterr().err
