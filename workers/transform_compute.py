"""The transform stage behind `StageCompute`: a job's denoising loop with the farm around it -- progress and
cancellation through the job record, checkpoints and preemption hand-back at step boundaries, a split
route's or a Wan2.2 expert's step range and the loop state it hands on, the job's step cache and LoRAs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from scheduler.core import jobs
from workers.fault_injection import TRANSFORM_STEP_POINT, pause_if_injected
from workers.stage_seam import MalformedJob, StageCompute, StageJob, StageOutputs
from workers.stages import StageCancelled, StagePreempted, split_state
from workers.stages.denoise_state import DenoiseState

if TYPE_CHECKING:
    from workers.dit_group import DitRankGroup
    from workers.lora_assets import WorkerLoras
    from workers.stages.transform import AtBoundary, DenoiseStage


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
        progress = jobs.ProgressWrites(rt.conn, job.job_id, hop)
        on_step, should_stop = progress.on_step, progress.should_stop

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
