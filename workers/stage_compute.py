"""Loads what a stage needs for each model it serves, once per worker process, behind `StageCompute`.

A worker may serve several models (say a t2v and an i2v checkpoint); each gets
its own compute object, keyed by the model name jobs use. The adapters here
wire a job's spec to the stage classes in `workers.stages` (which know nothing
of jobs) and to what the farm provides around them: the conditioning image from
the bucket, progress and cancellation through the job record, the upload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scheduler.core import jobs
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from workers.fault_injection import TRANSFORM_STEP_POINT, pause_if_injected
from workers.models.loading import Component, ModelTask, check_model_dir, model_task
from workers.models.ti2v import expands_timesteps
from workers.stage_seam import ComputeContext, MalformedJob, StageCompute, StageJob, StageOutputs
from workers.stages import StageCancelled, StagePreempted, split_state
from workers.stages.denoise_state import DenoiseState

if TYPE_CHECKING:
    import PIL.Image

    from workers.decode_group import DecodeRankGroup
    from workers.dit_group import DitRankGroup
    from workers.lora_assets import WorkerLoras
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.encode import TextEncodeStage
    from workers.stages.first_frame_encode import FirstFrameLatentStage
    from workers.stages.image_encode import ImageConditionStage
    from workers.stages.transform import AtBoundary, DenoiseStage


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
class TransformCompute(StageCompute):
    """The transform stage of one model: the DiT's denoising loop, reporting through the job record."""

    denoiser: DenoiseStage
    group: DitRankGroup | None = None  # with transform.context_parallel above 1: the ranks sharing each DiT call
    loras: WorkerLoras | None = None  # the LoRAs loaded into the DiT (None: this worker runs no LoRA jobs)
    # A two-expert worker's second DiT's LoRAs (the low-noise expert's, when it holds both).
    loras_2: WorkerLoras | None = None
    quantize: str = "none"  # transform.quantize, applied once at start (workers.stages.dit_quantize)

    def outputs_for(self, job: StageJob, inputs: Mapping[str, torch.Tensor]) -> StageOutputs:
        if self.group is None:
            return self._denoise(job, inputs)
        if job.spec.cache is not None:
            raise MalformedJob(
                "this transform worker runs the DiT context-parallel (transform.context_parallel), where step caching "
                "is not supported: resubmit without cache, or serve the model on a worker without context_parallel"
            )
        if not self.group.healthy():  # a rank died while the worker was idle
            self.denoiser.rank_sender = self.group.restart(self.denoiser.transformer)
        try:
            return self._denoise(job, inputs)
        except (StagePreempted, StageCancelled, MalformedJob):
            raise  # every rank finished its last call: the group is fine
        except Exception:
            # A rank may be mid-call or gone: start the group afresh for the next attempt, fail this one.
            self.denoiser.rank_sender = self.group.restart(self.denoiser.transformer)
            raise

    def record_fields(self) -> dict[str, str]:
        """The DiT rank group's size and health for the worker record (``reelfarm info``)."""
        return {} if self.group is None else self.group.describe()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

    def _denoise(self, job: StageJob, inputs: Mapping[str, torch.Tensor]) -> StageOutputs:
        rt, spec, hop = job.rt, job.spec, job.this_hop
        if spec.guidance_scale_2 is not None and self.denoiser.boundary_ratio is None:
            raise MalformedJob(
                f"guidance_scale_2 is for a Wan2.2 two-expert model and model {spec.model!r} has one DiT; "
                "resubmit without it"
            )
        # A split route's transform hop covers steps [k0, k1): one after the first starts from the state the
        # previous hop handed on; one before the last stops at k1 and hands its state on. An expert's hop
        # covers the steps of its timesteps, found here from the scheduler (both experts' workers agree).
        first, last = self._step_range(job)
        try:
            handed = split_state.state_of(inputs) if first > 0 else None
        except split_state.SplitStateError as exc:
            raise MalformedJob(str(exc)) from None
        embeds = split_state.conditioning_of(inputs)
        # The high-noise hop hands its state on even when its expert ran every step (the low hop then has none).
        stop_after = last if last < spec.steps or job.expert == "high" else None

        # 2. Transform: the denoising loop, publishing per-step progress, stoppable at step boundaries,
        #    resuming from the job's last saved state, saving every K steps, handing back when preempted.
        def on_step(done: int, total: int) -> None:
            jobs.set_progress(rt.conn, job.job_id, hop, done, total)

        def should_stop() -> bool:
            return jobs.cancel_requested(rt.conn, job.job_id)

        from workers.stages import dit_speed

        # A step cache keeps state across steps that a mid-denoise save does not hold, so a step-cached
        # job neither resumes nor saves mid-denoise (nor is preempted: it finishes on SIGTERM); its
        # finished latents are still checkpointed.
        resumable = rt.s3 is not None and rt.settings.checkpoints.enabled and spec.cache is None
        resume = None
        if resumable:
            from workers.checkpoints import state_from_checkpoint

            resume = state_from_checkpoint(rt, job.job_id, spec, hop)
        if resume is not None and not first <= resume.step <= last:
            resume = None  # another hop's range (a record edited by hand): start from what was handed on
        if resume is not None:
            jobs.set_recovery(rt.conn, job.job_id, hop, f"pulled; resumed at step {resume.step}")
        elif handed is not None:
            if handed.step != first:
                raise MalformedJob(f"the previous transform hop handed on step {handed.step}; {hop} starts at {first}")
            resume = handed
        captured: list[DenoiseState] = []
        boundary = saving_boundary(job) if resumable else None

        def at_boundary(done: int, total: int, capture: Callable[[], DenoiseState]) -> None:
            if done == stop_after:
                captured.append(capture())
                return
            if boundary is not None:
                boundary(done, total, capture)

        # The job's step cache and LoRAs (if any) are on for this job only: the DiT stays resident for the next one.
        dits = list(self.denoiser.experts.values())
        with dit_speed.step_cache(dits, spec.cache) as calls, self._loras_for(job) as loras:
            latents = self.denoiser.denoise(
                embeds,
                height=spec.height,
                width=spec.width,
                num_frames=spec.frames,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                guidance_scale_2=spec.guidance_scale_2,
                seed=spec.seed,
                flow_shift=spec.flow_shift,
                on_step=on_step,
                should_stop=should_stop,
                resume=resume,
                at_boundary=at_boundary,
                stop_after=stop_after,
            )
        report = {**self.denoiser.speed_options(), "quantize": self.quantize, **calls.as_record()}
        if self.denoiser.boundary_ratio is not None:
            # Which expert(s) ran here and the steps this hop covered: the record says how the job was split.
            report["experts"] = ",".join(self.denoiser.experts)
            report["steps"] = f"{first},{last}"
        if loras:
            report["loras"] = loras
        jobs.set_dit_report(rt.conn, job.job_id, report, hop)
        if stop_after is None:
            return {"latents": latents}
        # Resumed exactly at the boundary (this hop's earlier attempt saved it): nothing ran, the save is the state.
        state = captured[0] if captured else resume
        if state is None or state.step != stop_after:
            raise RuntimeError(f"{hop} ended without its state at step {stop_after}")
        if resumable and captured:
            # Kept as this hop's resume point, so a lost hand-off re-runs no step of this part.
            from workers.checkpoints import save_state

            save_state(rt, job.job_id, job.attempt, state, hop)
        return {**embeds, **split_state.state_tensors(state)}

    def _step_range(self, job: StageJob) -> tuple[int, int]:
        steps = job.spec.steps
        if job.expert is None:
            return job.steps if job.steps is not None else (0, steps)
        if self.denoiser.boundary_ratio is None:
            raise MalformedJob(
                f"{job.this_hop} runs a Wan2.2 expert's steps but model {job.spec.model!r} on this worker has one DiT; "
                "the model dir changed since the job was submitted: resubmit it"
            )
        boundary = self.denoiser.expert_steps(steps, job.spec.flow_shift)
        return (0, boundary) if job.expert == "high" else (boundary, steps)

    def _loras_for(self, job: StageJob) -> contextlib.AbstractContextManager[list[dict[str, object]]]:
        if self.loras is not None and self.loras_2 is not None:
            return _both_experts(self.loras.for_job(job.rt, job.spec), self.loras_2.for_job(job.rt, job.spec))
        if self.loras is not None:
            return self.loras.for_job(job.rt, job.spec)
        if job.spec.loras:
            raise MalformedJob(
                "this transform worker runs the DiT context-parallel (transform.context_parallel), where LoRAs are "
                "not supported: resubmit without loras, or serve the model on a worker without context_parallel"
            )
        return contextlib.nullcontext([])


@contextlib.contextmanager
def _both_experts(
    first: contextlib.AbstractContextManager[list[dict[str, object]]],
    second: contextlib.AbstractContextManager[list[dict[str, object]]],
) -> Iterator[list[dict[str, object]]]:
    with first as high, second as low:
        yield [*high, *low]


def saving_boundary(job: StageJob) -> AtBoundary:
    """The transform's step-boundary hook: save every K steps (in the background), and on preemption save,
    wait for the save, and hand the job back (``StagePreempted``)."""
    from workers.checkpoints import save_state

    rt, settings, hop = job.rt, job.rt.settings.checkpoints, job.this_hop
    interval = settings.save_interval(job.spec.steps)
    preemptible = settings.preempts(job.spec.steps)

    def at_boundary(done: int, total: int, capture: Callable[[], DenoiseState]) -> None:
        if done < total:
            if preemptible and rt.preempt.is_set():
                saved = save_state(rt, job.job_id, job.attempt, capture(), hop).result()
                raise StagePreempted(f"worker stopping: handed back after step {done} of {total}, state saved: {saved}")
            if interval and done % interval == 0:
                save_state(rt, job.job_id, job.attempt, capture(), hop)
        # Tests only: widen the window around a step boundary (every step, or one step).
        pause_if_injected(TRANSFORM_STEP_POINT)
        pause_if_injected(f"{TRANSFORM_STEP_POINT}-{done}")

    return at_boundary


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
# Wan2.2-TI2V image-to-video encodes the image with the VAE only (no CLIP tower in the directory).
TI2V_I2V_ENCODE_COMPONENTS: tuple[Component, ...] = ("text_encoder", "tokenizer", "vae")


def stage_components(stage: Stage, model_dir: Path, task: ModelTask) -> tuple[Component, ...]:
    """What ``stage`` loads of ``model_dir`` for ``task`` (`STAGE_COMPONENTS`, TI2V's i2v encode aside)."""
    if stage is Stage.ENCODE and task == "i2v" and expands_timesteps(model_dir):
        return TI2V_I2V_ENCODE_COMPONENTS
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

            image = ImageConditionStage(model_dir, device=device, dtype=dtype)
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
