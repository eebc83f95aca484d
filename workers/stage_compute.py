"""Loads what a stage needs for each model it serves, once per worker process, behind `StageCompute`.

A worker may serve several models (say a t2v and an i2v checkpoint); each gets
its own compute object, keyed by the model name jobs use. The adapters here
wire a job's spec to the stage classes in `workers.stages` (which know nothing
of jobs) and to what the farm provides around them: the conditioning image from
the bucket, progress and cancellation through the job record, the upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from workers.models.loading import Component, ModelTask, check_model_dir, dit_takes_clip_features, model_task
from workers.models.ti2v import expands_timesteps
from workers.stage_seam import ComputeContext, MalformedJob, StageCompute, StageJob, StageOutputs
from workers.transform_compute import TransformCompute

if TYPE_CHECKING:
    import PIL.Image

    from workers.decode_group import DecodeRankGroup
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.encode import TextEncodeStage
    from workers.stages.first_frame_encode import FirstFrameLatentStage
    from workers.stages.image_encode import ImageConditionStage


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown worker dtype {name!r}: use one of {', '.join(dtypes)}")
    return dtypes[name]


@dataclass
class EncodeCompute(StageCompute):
    """The encode stage of one model: the text encoder, plus the image encoders for an i2v model (for
    Wan2.2-TI2V i2v, the VAE alone: the image becomes the first latent frame)."""

    text: TextEncodeStage
    image: ImageConditionStage | FirstFrameLatentStage | None

    def outputs_for(self, job: StageJob, inputs: Mapping[str, torch.Tensor]) -> StageOutputs:
        spec = job.spec
        # 1. Encode: text embeddings (and the negative ones when CFG is on); for i2v also the image
        #    features and the VAE-encoded first-frame condition.
        tensors: dict[str, torch.Tensor] = self.text.encode(spec.prompt, spec.negative_prompt, spec.guidance_scale)
        if spec.image is not None:
            if self.image is None:
                raise MalformedJob(f"model {spec.model!r} has no image encoder; the job is {spec.task}")
            image = load_job_image(job.rt, spec.image)
            tensors.update(
                self.image.encode(
                    image, height=spec.height, width=spec.width, num_frames=spec.frames, policy=spec.resize
                )
            )
        return tensors


@dataclass
class DecodeCompute(StageCompute):
    """The decode stage of one model: the streaming VAE, feeding the encoder and the upload."""

    decoder: StreamingVaeDecoder
    group: DecodeRankGroup | None = None  # with decode_grid above 1x1: the ranks sharing the decode

    def outputs_for(self, job: StageJob, inputs: Mapping[str, torch.Tensor]) -> StageOutputs:
        # Imported here: only decode workers load the upload and video-encoder modules.
        from workers.render_upload import render_and_upload

        if self.group is None:
            # 3. Decode: streaming VAE decode -> ffmpeg -> multipart upload.
            return render_and_upload(job.rt, self.decoder, job.job_id, job.spec, inputs["latents"])
        sharded = self.group.decoder if self.group.healthy() else None
        if sharded is None:  # a rank died while the worker was idle
            sharded = self.group.restart()
        try:
            # 3. Decode, sharded: the same, with the VAE spread over the group's ranks.
            return render_and_upload(job.rt, sharded, job.job_id, job.spec, inputs["latents"])
        except Exception:
            # A failure anywhere (a rank, ffmpeg, the upload) can leave the followers mid-job: start the
            # group afresh for the next attempt, then fail this one like any decode failure.
            self.group.restart()
            raise

    def record_fields(self) -> dict[str, str]:
        """The decode group's ranks, grid and health for the worker record (``reelfarm info``)."""
        return {} if self.group is None else self.group.describe()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


def load_job_image(rt: ComputeContext, uri: str) -> PIL.Image.Image:
    """The conditioning image submission stored in the bucket (checked again: the bucket is not trusted more)."""
    from scheduler.core.image_checks import ImageInputError, load_and_check_image
    from scheduler.core.object_store import get_bytes

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    limits = rt.settings.limits
    try:
        return load_and_check_image(
            get_bytes(rt.s3, bucket, key), max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels
        )
    except ImageInputError as exc:
        raise MalformedJob(f"conditioning image {uri}: {exc}") from None


# What each stage loads of a model dir, by task, in the order a missing piece is reported. Checked
# once, before any weights load: a dir without its VAE fails at start-up, not after the text encoder.
STAGE_COMPONENTS: dict[Stage, dict[ModelTask, tuple[Component, ...]]] = {
    Stage.ENCODE: {
        "t2v": ("text_encoder", "tokenizer"),
        "i2v": ("text_encoder", "tokenizer", "image_encoder", "image_processor", "vae"),
    },
    Stage.TRANSFORM: {"t2v": ("transformer", "scheduler"), "i2v": ("transformer", "scheduler")},
    Stage.DECODE: {"t2v": ("vae",), "i2v": ("vae",)},
}
# Wan2.2-TI2V and Wan2.2-I2V-A14B image-to-video encode the image with the VAE only (their DiTs take no
# CLIP features; their directories have no CLIP tower).
VAE_ONLY_I2V_ENCODE_COMPONENTS: tuple[Component, ...] = ("text_encoder", "tokenizer", "vae")


def stage_components(stage: Stage, model_dir: Path, task: ModelTask) -> tuple[Component, ...]:
    """What ``stage`` loads of ``model_dir`` for ``task`` (`STAGE_COMPONENTS`, TI2V's i2v encode aside)."""
    if stage is Stage.ENCODE and task == "i2v" and not dit_takes_clip_features(model_dir):
        return VAE_ONLY_I2V_ENCODE_COMPONENTS
    return STAGE_COMPONENTS[stage][task]


def load_stage_compute(stage: Stage, model_dir: Path, settings: FarmSettings, model: str = "default") -> StageCompute:
    device, dtype = settings.worker.device, torch_dtype(settings.worker.dtype)
    check_model_dir(model_dir, [])
    task = model_task(model_dir)
    check_model_dir(model_dir, stage_components(stage, model_dir, task))
    if stage is Stage.ENCODE:
        from workers.stages.encode import TextEncodeStage

        image: ImageConditionStage | FirstFrameLatentStage | None = None
        if task == "i2v" and expands_timesteps(model_dir):
            from workers.stages.first_frame_encode import FirstFrameLatentStage

            image = FirstFrameLatentStage(model_dir, device=device, dtype=dtype)
        elif task == "i2v":
            from workers.stages.image_encode import ImageConditionStage

            image = ImageConditionStage(
                model_dir, device=device, dtype=dtype, clip=dit_takes_clip_features(model_dir)
            )
        return EncodeCompute(TextEncodeStage(model_dir, device=device, dtype=dtype), image)
    if stage is Stage.TRANSFORM:
        from workers.stages.transform import DenoiseStage

        speed = settings.transform
        if speed.context_parallel > 1 and (speed.batch_size > 1 or speed.compile or speed.quantize != "none"):
            raise ValueError(
                "transform.context_parallel runs one job over several devices: set transform.batch_size to 1, "
                "transform.compile to false and transform.quantize to none with it"
            )
        denoiser = DenoiseStage(
            model_dir,
            device=device,
            dtype=dtype,
            one_pass_guidance=speed.one_pass_guidance,
            compile_blocks=speed.compile,
            attention_backend=speed.attention_backend,
            batch_jobs=speed.batch_size > 1,
            experts=None if settings.worker.expert is None else (settings.worker.expert,),
        )
        if len(denoiser.experts) > 1 and speed.context_parallel > 1:
            raise ValueError(
                f"model {model!r} has two experts and transform.context_parallel runs one DiT over a rank group: "
                "start this worker with --expert high or --expert low (one DiT each), or set context_parallel to 1"
            )
        options = settings.model_options.get(model)
        if options is not None:
            from workers.stages.samplers import sampler_template

            denoiser.scheduler_template = sampler_template(denoiser.scheduler_template, options.sampler)
        if speed.context_parallel == 1:
            from workers.lora_assets import WorkerLoras
            from workers.stages.dit_quantize import quantize_dit

            two = denoiser.boundary_ratio is not None
            for dit in denoiser.experts.values():
                quantize_dit(dit, speed.quantize)
            loras = [
                WorkerLoras(dit, speed.lora_cache, expert if two else None) for expert, dit in denoiser.experts.items()
            ]
            return TransformCompute(
                denoiser, loras=loras[0], loras_2=loras[1] if len(loras) > 1 else None, quantize=speed.quantize
            )
        from workers.dit_group import DitRankGroup

        dit_group = DitRankGroup(
            model_dir,
            speed.context_parallel,
            device=device,
            dtype=settings.worker.dtype,
            threads_per_rank=max(1, torch.get_num_threads() // speed.context_parallel),
        )
        denoiser.rank_sender = dit_group.start(denoiser.transformer)
        return TransformCompute(denoiser, dit_group)
    from workers.stages.decode import StreamingVaeDecoder

    if settings.worker.decode_grid != "1x1" and device != "cpu":
        # The group's collectives are gloo on CPU tensors; an nccl group (one GPU per rank) is not built yet.
        raise ValueError(
            f"worker.decode_grid {settings.worker.decode_grid} runs on CPU only; set worker.decode_grid: 1x1 for device {device}"
        )
    decoder = StreamingVaeDecoder(model_dir, device=device, dtype=dtype)
    if settings.worker.decode_grid == "1x1":
        return DecodeCompute(decoder)
    from workers.decode_group import DecodeRankGroup
    from workers.stages.sharded_decode import ShardGrid

    grid = ShardGrid.parse(settings.worker.decode_grid)
    threads = max(1, torch.get_num_threads() // grid.size)
    timeout = settings.worker.decode_group_timeout_seconds
    group = DecodeRankGroup(model_dir, grid, timeout, threads_per_rank=threads, dtype=settings.worker.dtype)
    group.start(decoder)
    return DecodeCompute(decoder, group)


def load_all(stage: Stage, settings: FarmSettings) -> tuple[dict[str, StageCompute], dict[str, str]]:
    """Compute objects and tasks for every model this worker serves."""
    computes: dict[str, StageCompute] = {}
    tasks: dict[str, str] = {}
    for name, model_dir in settings.served_models().items():
        computes[name] = load_stage_compute(stage, model_dir, settings, name)
        tasks[name] = model_task(model_dir)
    return computes, tasks
