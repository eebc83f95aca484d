"""The function rq runs for every stage job: pull inputs, compute, hand off or upload.

rq calls ``run_stage`` by name inside the (non-forking) stage worker, so the
model loaded at start-up is the one used here. Compute -- the decode stage's
upload included -- is one call on the model's `StageCompute`
(`workers.stage_seam`), the same for every stage; hand-off is
``workers.handoff``'s.

Outcomes never escape as exceptions to rq: the job record is the source of
truth. Lost inputs and failed attempts go back through ``recovery.restart_job``
(lineage, backoff, quarantine); a refused descriptor fails the job; a stale
attempt -- one the farm already replaced -- discards its output.

The DiT's work is kept apart (``workers.checkpoints``): a finished transform's
latents are checkpointed in the background right after the hand-off, a decode
that cannot pull them reads that checkpoint before falling back to lineage, and
a preempted transform hands its job back with its state saved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
import torch

from scheduler.core import durability, job_retry, jobs, keys, recovery, worker_metrics, worker_registry
from scheduler.core.job_record import Routing, StageField, attempt_of, is_finished
from scheduler.core.keys import Hop, Stage
from scheduler.core.logging_setup import log_context
from scheduler.core.route import Route, route_of
from scheduler.core.spec import JobSpec
from scheduler.core.stage_calls import StageCall
from workers import checkpoints
from workers.fault_injection import crash_if_injected, pause_if_injected, pull_point
from workers.handoff import InputLost, InputRefused, pull_input, stage_output
from workers.runtime import StageRuntime, current_runtime
from workers.stage_seam import MalformedJob, StageJob, StageOutputs
from workers.stages import StageCancelled, StagePreempted

log = logging.getLogger("reelfarm.stage")


def run_stage(job_id: str, stage: str, attempt: int, upstream_attempt: int | None) -> dict[str, Any]:
    with log_context(job_id=job_id, stage=stage):
        return _run_stage(job_id, stage, attempt, upstream_attempt)


def _run_stage(job_id: str, stage: str, attempt: int, upstream_attempt: int | None) -> dict[str, Any]:
    rt = current_runtime()
    this_stage = Hop(stage)
    if this_stage.kind is not rt.stage:
        raise RuntimeError(f"a {stage} job reached a {rt.stage.value} worker: check the queue names in settings")
    fields = jobs.job_fields(rt.conn, job_id)
    if not fields or is_finished(fields) or attempt_of(fields, this_stage) != attempt:
        log.info("job %s: %s attempt %d is stale or finished; skipped", job_id, stage, attempt)
        return {"job_id": job_id, "stage": stage, "outcome": "skipped"}
    try:
        route = route_of(fields)
        if this_stage not in route:
            raise ValueError(f"{this_stage.value} is not on it ({route.describe()})")
    except ValueError as exc:
        # Planted or written by a newer version: no retry can make it readable.
        jobs.mark_failed(rt.conn, job_id, this_stage, f"the job's route is unusable: {exc}")
        return {"job_id": job_id, "stage": stage, "outcome": "failed: unusable route"}
    # The record read above answers the cancel check and holds the spec: no more round trips before the start.
    if jobs.cancel_requested_in(fields):
        # Cancelled between stages: free the producer's slot now instead of at lease expiry.
        if upstream_attempt is not None:
            rt.rooms.release_input(job_id, route.previous(this_stage), upstream_attempt)
        jobs.mark_cancelled(rt.conn, job_id, this_stage, jobs.CANCEL_REASON)
        checkpoints.on_job_ended(rt, job_id, completed=False)
        return {"job_id": job_id, "stage": stage, "outcome": "cancelled"}
    started = time.monotonic()
    if not jobs.mark_stage_started(rt.conn, job_id, this_stage, rt.worker_id, attempt):
        # Another copy of this attempt got there first (see jobs.mark_stage_started); it owns the run.
        log.info("job %s: %s attempt %d is already running elsewhere; skipped", job_id, stage, attempt)
        return {"job_id": job_id, "stage": stage, "outcome": "skipped"}
    rt.job_began(job_id)
    outcome = "done"
    try:
        try:
            spec = jobs.spec_in(fields, job_id)
        except ValueError as exc:
            raise MalformedJob(f"job record has an unreadable spec: {str(exc).splitlines()[0]}") from None
        crash_if_injected(rt.stage.value, spec.prompt)
        inputs: dict[str, torch.Tensor] = {}
        upstream = route.previous(this_stage)
        pulled: tuple[int, float] | None = None
        if upstream is not None:
            pause_if_injected(pull_point(rt.stage.value), spec.prompt)
            pull_started = time.monotonic()
            inputs = _pull_or_checkpoint(rt, job_id, spec, this_stage, upstream, upstream_attempt or 1)
            pulled = (sum(t.nbytes for t in inputs.values()), time.monotonic() - pull_started)
        pause_if_injected(rt.stage.value, spec.prompt)
        compute_started = time.monotonic()
        job = StageJob(
            rt, job_id, spec, attempt, this_stage, route.steps_of(this_stage), route.expert_of(this_stage)
        )
        outputs = _compute(rt, job, inputs)
        timing = StageTiming(started, time.monotonic() - compute_started, pulled)
        if not _finish(rt, job, route, outputs, timing):
            outcome = "superseded"
        elif route.next(this_stage) is None:
            checkpoints.on_job_ended(rt, job_id, completed=True)
    except (InputRefused, MalformedJob) as exc:
        outcome = f"failed: {exc}"
        pipe = rt.conn.pipeline(transaction=True)
        jobs.clear_inflight(pipe, job_id, this_stage, attempt)
        jobs.mark_failed(
            pipe, job_id, this_stage, f"input refused: {exc}" if isinstance(exc, InputRefused) else str(exc)
        )
        pipe.execute()
    except InputLost as exc:
        outcome = _restart(rt, job_id, this_stage, attempt, f"input lost: {exc}", delay=0.0)
    except StageCancelled as exc:
        outcome = "cancelled"
        pipe = rt.conn.pipeline(transaction=True)
        jobs.clear_inflight(pipe, job_id, this_stage, attempt)
        jobs.mark_cancelled(pipe, job_id, this_stage, str(exc))
        pipe.execute()
        checkpoints.on_job_ended(rt, job_id, completed=False)
    except StagePreempted as exc:
        # Handed back at once with its state saved; another worker resumes it from there.
        outcome = _restart(rt, job_id, this_stage, attempt, f"preempted: {exc}", delay=0.0, preempted=True)
    except Exception as exc:  # noqa: BLE001 - any stage error is retried with backoff, then quarantined
        log.exception("job %s: %s attempt %d raised", job_id, stage, attempt)
        backoff = rt.settings.worker.retry_backoff_seconds * 2 ** (attempt - 1)
        outcome = _restart(rt, job_id, this_stage, attempt, _one_line(exc), delay=backoff)
    except BaseException:
        # Forced shutdown (second SIGTERM, Ctrl-C): hand the job back before the process goes.
        _restart(rt, job_id, this_stage, attempt, "worker shut down mid-job", delay=0.0, preempted=True)
        raise
    finally:
        rt.job_ended(job_id)
    worker_metrics.observe_stage(this_stage, time.monotonic() - started, outcome)
    return {"job_id": job_id, "stage": stage, "outcome": outcome, "seconds": round(time.monotonic() - started, 3)}


REDIS_OUTAGE_PATIENCE_SECONDS = 300.0


def _restart(
    rt: StageRuntime, job_id: str, stage: Hop, attempt: int, reason: str, delay: float, preempted: bool = False
) -> str:
    # The failure may *be* a Redis outage: keep trying to record the restart until Redis is back,
    # because while this worker lives the reaper will not take its in-flight attempt away.
    deadline = time.monotonic() + REDIS_OUTAGE_PATIENCE_SECONDS
    while True:
        try:
            return recovery.restart_job(
                rt.conn,
                job_id,
                stage,
                attempt,
                reason,
                max_attempts=rt.settings.worker.max_attempts,
                delay_seconds=delay,
                worker_id=rt.worker_id,
                preempted=preempted,
                max_preemptions=rt.settings.worker.max_preemptions,
                secret=rt.secret,
            )
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                log.error("job %s: could not record the failure (%s); exiting so the reaper recovers it", job_id, exc)
                raise SystemExit(3) from None
            log.warning("job %s: Redis unavailable while recording a failure (%s); retrying", job_id, exc)
            time.sleep(1.0)


def _pull_or_checkpoint(
    rt: StageRuntime, job_id: str, spec: JobSpec, hop: Hop, upstream: Hop, upstream_attempt: int
) -> dict[str, torch.Tensor]:
    """The upstream hop's tensors: pulled from its producer, or -- when that is lost and the DiT's finished
    latents were checkpointed (decode's upstream) -- read from the checkpoint instead of recomputing the DiT."""
    try:
        inputs = pull_input(rt, job_id, upstream, upstream_attempt)
    except InputLost as lost:
        finished_latents = upstream.kind is Stage.TRANSFORM and hop.kind is Stage.DECODE
        if not finished_latents or rt.s3 is None or not rt.settings.checkpoints.enabled:
            raise
        try:
            inputs, from_attempt = checkpoints.latents_from_checkpoint(rt, job_id, spec, upstream)
        except checkpoints.CheckpointUnusable as exc:
            # Forgotten, so the restart below goes to lineage instead of back to this checkpoint.
            jobs.forget_checkpoint(rt.conn, job_id, upstream, StageField.CHECKPOINT)
            raise InputLost(f"{lost}; no usable checkpoint either ({exc})") from None
        log.info("job %s: %s; read the latents checkpoint of %s attempt %d", job_id, lost, upstream, from_attempt)
        jobs.set_recovery(rt.conn, job_id, hop, f"from checkpoint ({upstream} attempt {from_attempt})")
        return inputs
    jobs.set_recovery(rt.conn, job_id, hop, "pulled")
    return inputs


def _compute(rt: StageRuntime, job: StageJob, inputs: dict[str, torch.Tensor]) -> StageOutputs:
    spec = job.spec
    compute = rt.computes.get(spec.model)
    if compute is None:
        raise MalformedJob(
            f"model {spec.model!r} reached a worker that does not serve it (serves {', '.join(rt.computes)})"
        )
    if (spec.image is not None) != (rt.tasks[spec.model] == "i2v"):
        raise MalformedJob(f"model {spec.model!r} is a {rt.tasks[spec.model]} model; the job is {spec.task}")
    return compute.outputs_for(job, inputs)


@dataclass(frozen=True)
class StageTiming:
    """What the finished stage records besides its outcome: when it started, the model's seconds, the pull."""

    started: float  # time.monotonic() at the start fence
    compute_seconds: float
    pulled: tuple[int, float] | None  # input bytes and pull seconds; None for encode


def _finish(rt: StageRuntime, job: StageJob, route: Route, outputs: StageOutputs, timing: StageTiming) -> bool:
    """Publish and enqueue the route's next hop (or record the result), fenced on this attempt still being current."""
    job_id, spec, attempt, hop = job.job_id, job.spec, job.attempt, job.this_hop
    next_stage = route.next(hop)
    room_key = None
    if next_stage is not None:
        desc, signature = stage_output(rt, job_id, attempt, outputs, hop)
        room_key = keys.room_key(job_id, hop, attempt)
    with rt.conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(keys.job_key(job_id))
                fields = jobs.job_fields(pipe, job_id)
                if attempt_of(fields, hop) != attempt or is_finished(fields):
                    pipe.unwatch()
                    log.warning("job %s: %s attempt %d was superseded; output discarded", job_id, hop, attempt)
                    if room_key is not None:
                        rt.free_slot_of(room_key, "superseded")
                    jobs.clear_inflight(rt.conn, job_id, hop, attempt)
                    return False
                pipe.multi()
                jobs.mark_stage_finished(
                    pipe,
                    job_id,
                    hop,
                    attempt,
                    time.monotonic() - timing.started,
                    timing.compute_seconds,
                    timing.pulled,
                )
                if next_stage is not None:
                    next_call = StageCall(job_id, next_stage, attempt_of(fields, next_stage) + 1, attempt)
                    rt.rooms.publish(desc, signature, pipeline=pipe)
                    job_retry.queue_stage(pipe, rt.conn, next_call, Routing(spec.priority, spec.model), secret=rt.secret)
                else:
                    jobs.mark_succeeded(pipe, job_id, outputs)
                worker_registry.increment(pipe, rt.worker_id, "jobs_done")
                pipe.execute()
                # Before rq hears the stage is done: a failover must not lose a commit the farm acted on.
                durability.confirm(rt.conn, rt.settings, "hand-off" if next_stage is not None else "finish")
                rt.jobs_done += 1
                finished_dit = hop.kind is Stage.TRANSFORM and next_stage is not None and next_stage.kind is Stage.DECODE
                if finished_dit and rt.s3 is not None and rt.settings.checkpoints.enabled:
                    # After the publish: the checkpoint never delays the hand-off.
                    checkpoints.save_latents(rt, job_id, attempt, outputs["latents"], spec.steps, hop)
                return True
            except redis.WatchError:
                continue


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
