"""The function rq runs for every stage job: pull inputs, compute, hand off or upload.

rq calls ``run_stage`` by name inside the (non-forking) stage worker, so the
model loaded at start-up is the one used here. Compute is delegated to the
stage classes; hand-off to ``workers.handoff``; storage to ``render_upload``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from scheduler import jobs, queues, worker_registry
from scheduler.keys import Stage
from scheduler.spec import JobSpec
from workers.handoff import pull_input, stage_output
from workers.runtime import StageRuntime, current_runtime

log = logging.getLogger("reelfarm.stage")


def run_stage(job_id: str, stage: str, attempt: int, upstream_attempt: int | None) -> dict[str, Any]:
    rt = current_runtime()
    this_stage = Stage(stage)
    if this_stage is not rt.stage:
        raise RuntimeError(f"a {stage} job reached a {rt.stage.value} worker: check the queue names in settings")
    started = time.monotonic()
    jobs.mark_stage_started(rt.conn, job_id, this_stage, rt.worker_id, attempt)
    worker_registry.update_worker(rt.conn, rt.worker_id, {"state": "busy", "current_job": job_id})
    try:
        spec = jobs.load_spec(rt.conn, job_id)
        inputs: dict[str, torch.Tensor] = {}
        upstream = this_stage.previous
        if upstream is not None:
            inputs = pull_input(rt, job_id, upstream, upstream_attempt or 1)
        outputs = _compute(rt, job_id, spec, inputs)
        _finish(rt, job_id, spec, attempt, outputs, started)
    except Exception as exc:
        reason = _one_line(exc)
        log.exception("job %s failed in %s", job_id, stage)
        jobs.mark_failed(rt.conn, job_id, this_stage, reason)
        raise
    finally:
        worker_registry.update_worker(rt.conn, rt.worker_id, {"state": "idle", "current_job": ""})
    return {"job_id": job_id, "stage": stage, "seconds": round(time.monotonic() - started, 3)}


def _compute(rt: StageRuntime, job_id: str, spec: JobSpec, inputs: dict[str, torch.Tensor]) -> Any:
    # 1. Encode: text embeddings (and the negative ones when CFG is on).
    if rt.stage is Stage.ENCODE:
        return rt.compute.encode(spec.prompt, spec.negative_prompt, spec.guidance_scale)

    # 2. Transform: the denoising loop, publishing per-step progress.
    if rt.stage is Stage.TRANSFORM:

        def on_step(done: int, total: int) -> None:
            jobs.set_progress(rt.conn, job_id, Stage.TRANSFORM, done, total)

        latents = rt.compute.denoise(
            inputs,
            height=spec.height,
            width=spec.width,
            num_frames=spec.frames,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            seed=spec.seed,
            flow_shift=spec.flow_shift,
            on_step=on_step,
        )
        return {"latents": latents}

    # 3. Decode: streaming VAE decode -> ffmpeg -> multipart upload.
    from workers.render_upload import render_and_upload

    return render_and_upload(rt, job_id, spec, inputs["latents"])


def _finish(rt: StageRuntime, job_id: str, spec: JobSpec, attempt: int, outputs: Any, started: float) -> None:
    pipe = queues.transaction(rt.conn)
    jobs.mark_stage_finished(pipe, job_id, rt.stage, time.monotonic() - started)
    next_stage = rt.stage.next
    if next_stage is not None:
        desc, signature = stage_output(rt, job_id, attempt, outputs)
        rt.rooms.publish(desc, signature, pipeline=pipe)
        jobs.mark_stage_queued(pipe, job_id, next_stage, attempt=1)
        queues.enqueue_stage(
            rt.conn, job_id, next_stage, attempt=1, upstream_attempt=attempt, priority=spec.priority, pipeline=pipe
        )
    else:
        jobs.mark_succeeded(pipe, job_id, outputs)
    worker_registry.increment(pipe, rt.worker_id, "jobs_done")
    pipe.execute()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
