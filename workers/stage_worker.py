"""The rq worker class of a stage: non-forking, takes a job only when a slot is free, runs only signed stage calls.

Non-forking (rq's SimpleWorker) keeps the model resident across jobs. The
backpressure rule sits in front of rq's dequeue: a producer whose slots are all
held for consumers does not pop a job it could not hand off, leaving it queued
for a worker that can.

The side door rq leaves open -- it imports and calls any function, callback or
webhook a Redis writer names -- is closed here, between dequeue and execution:
every dequeued rq job is vetted by ``scheduler.core.stage_calls.vet_call`` before rq
touches its function, and a job that fails is refused (never imported or
called), recorded, counted, and the worker goes on. An rq job whose hash rq
cannot even read is refused the same way instead of ending the work loop.

A transform worker with ``transform.batch_size`` above 1 takes compatible queued jobs beside the
one rq gave it (`workers.batch_take`, each vetted like the first) and runs each in a thread of its
own through rq's usual execution, so every job keeps its own lifecycle; their denoising steps
share DiT calls (`workers.stages.step_batcher`).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import redis

from scheduler.core import jobs, worker_metrics
from scheduler.core.keys import Hop, Stage
from scheduler.core.queues import (
    FarmWorker,
    TimerDeathPenalty,
    WorkerStatus,
    call_fields,
    clean_registries_without_hooks,
    fetch_stage_job,
    mark_claimed_started,
    remove_refused,
)
from scheduler.core.stage_calls import (
    CallFields,
    CallRefused,
    Refusal,
    RefusalReason,
    job_id_named,
    printable,
    record_refusal,
    vet_call,
)
from workers.batch_take import take_batch_mates
from workers.runtime import StageRuntime

log = logging.getLogger("reelfarm.worker")


class WarmExit(SystemExit):
    """SIGTERM on an idle worker: leave now (after draining held outputs); there is no job to finish."""


class StageWorker(FarmWorker):
    runtime: StageRuntime
    # A timer, not SIGALRM: the jobs of a batch run in threads, where no signal handler can be set.
    # Stage calls carry no rq timeout (the farm keeps its own deadlines), so it never fires anyway.
    death_penalty_class = TimerDeathPenalty

    def request_stop(self, signum: int, frame: Any) -> None:
        # rq signals an idle stop with an Exception subclass, which redis-py turns into a
        # ConnectionError when it lands inside a reconnect during a Redis outage -- rq then
        # retries forever and the stop is lost. A SystemExit passes through both.
        if self.get_state() != "busy":
            # Remembered too: rq's teardown may replace the exit with a ConnectionError during an outage.
            self._stop_requested = True
            raise WarmExit(0)
        # Busy: a preemptible denoise (settings.checkpoints) saves at its next step and hands the job
        # back; any other job finishes first. Either way rq stops taking jobs after this one.
        self.runtime.preempt.set()
        super().request_stop(signum, frame)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        while True:
            while self.runtime.produces and not self.runtime.wait_for_free_slot(timeout=1.0):
                self.heartbeat()
                if self._stop_requested:
                    return None
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except redis.RedisError:
                raise
            except Exception as exc:  # noqa: BLE001 - rq could not read the job hash it popped
                rq_job_id, queue = getattr(exc, "job_id", None), getattr(exc, "queue", None)
                if rq_job_id is None or queue is None:
                    raise
                self._refuse_unreadable(queue, rq_job_id, exc)

    def execute_job(self, job: Any, queue: Any) -> None:
        try:
            allowed = self._vetted_or_refused(job, queue)
        except redis.RedisError as exc:
            # rq's work loop would end on it. The job stays in rq's dequeued list, from which the
            # reaper puts it back (queues.requeue_stranded), to be checked again.
            log.warning("rq job %s: Redis failed while checking it (%s); the reaper will put it back", job.id, exc)
            return
        if not allowed:
            return
        mates = []
        if self.runtime.settings.transform.batch_size > 1:
            try:
                mates = take_batch_mates(self.runtime, self.queues, str(job.kwargs["job_id"]), self._take_claimed)
            except redis.RedisError as exc:
                log.warning("rq job %s: Redis failed while looking for batch-mates (%s); running it alone", job.id, exc)
        if not mates:
            super().execute_job(job, queue)
            return
        self._execute_batch((job, queue), mates)

    def _take_claimed(self, queue: Any, rq_job_id: str) -> Any | None:
        """A batch-mate this worker took off ``queue``: its rq job once vetted, or None (refused, or gone)."""
        try:
            job = fetch_stage_job(self.connection, rq_job_id)
        except redis.RedisError:
            raise
        except Exception as exc:  # noqa: BLE001 - rq could not read the job hash (or it was deleted meanwhile)
            self._refuse_unreadable(queue, rq_job_id, exc)
            return None
        return job if self._vetted_or_refused(job, queue) else None

    def _execute_batch(self, leader: tuple[Any, Any], mates: list[tuple[Any, Any]]) -> None:
        """Run each job in its own thread through rq's execution, as ``execute_job`` runs one; wait for all."""
        members = [(*leader, False), *((job, queue, True) for job, queue in mates)]
        log.info("running %d transform jobs as a batch: %s", len(members), ", ".join(m[0].id for m in members))
        threads = [
            threading.Thread(target=self._perform_member, args=member, name=f"batch-{member[0].id}", daemon=True)
            for member in members
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            # In short waits: the main thread must stay free to take SIGTERM (preemption, stop).
            while thread.is_alive():
                thread.join(timeout=0.2)
        self.set_state(WorkerStatus.IDLE)

    def _perform_member(self, job: Any, queue: Any, claimed: bool) -> None:
        if claimed:  # a mate this worker took by id (batch_take); rq dequeued the leader itself
            mark_claimed_started(self.connection, queue, job.id)
        execution = self.prepare_execution(job)
        self.perform_job(job, queue, execution)

    def _vetted_or_refused(self, job: Any, queue: Any) -> bool:
        """True if ``job`` is a signed stage call this worker may run; otherwise it is refused (False)."""
        try:
            fields = call_fields(job)
        except ValueError as exc:
            unreadable = CallFields(rq_job_id=job.id, func_name=None)
            self._refuse(queue, unreadable, CallRefused(RefusalReason.UNREADABLE, str(exc)))
            return False
        try:
            vet_call(fields, self.runtime.stage, self.runtime.accepted_secrets)
        except CallRefused as refused:
            self._refuse(queue, fields, refused)
            return False
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # Data of a shape nobody planned for: refused like any unreadable job, never a crash.
            self._refuse(queue, fields, CallRefused(RefusalReason.UNREADABLE, f"unexpected job data ({exc!r})"[:300]))
            return False
        return True

    def clean_registries(self) -> None:
        # rq's version runs failure callbacks and webhooks of expired jobs nobody vetted (see
        # queues.clean_registries_without_hooks); the reaper owns recovery of stage calls.
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                clean_registries_without_hooks(queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = datetime.now(UTC)  # type: ignore[assignment]

    def _refuse_unreadable(self, queue: Any, rq_job_id: str, exc: Exception) -> None:
        fields = CallFields(rq_job_id=rq_job_id, func_name=None)
        self._refuse(queue, fields, CallRefused(RefusalReason.UNREADABLE, f"rq cannot read it: {exc!r}"[:300]))

    def _refuse(self, queue: Any, fields: CallFields, refused: CallRefused) -> None:
        rt = self.runtime
        job_id = job_id_named(fields)
        refusal = Refusal(
            at=time.time(),
            queue=queue.name,
            rq_job_id=fields.rq_job_id,
            function=printable(fields.func_name),
            reason=refused.reason.value,
            detail=str(refused),
            worker=rt.worker_id,
            job_id=job_id,
        )
        log.error(
            "refused rq job %s from queue %s: function %s: %s (%s); it was not run",
            fields.rq_job_id,
            queue.name,
            refusal.function,
            refused,
            refused.reason,
        )
        with rt.conn.pipeline(transaction=True) as pipe:
            remove_refused(pipe, queue, fields.rq_job_id)
            record_refusal(pipe, refusal)
            pipe.execute()
        worker_metrics.count_refused_call(rt.stage, refused.reason.value)
        if refused.reason is RefusalReason.SIGNATURE and job_id:
            # A well-formed call this worker cannot verify is most likely the farm's own, signed with a
            # secret this worker lacks: fail the job it is for (if it still waits on exactly this attempt)
            # with the fix, rather than leave it queued forever.
            attempt = fields.kwargs.get("attempt") if isinstance(fields.kwargs, dict) else None
            if isinstance(attempt, int) and jobs.fail_if_waiting(
                rt.conn,
                job_id,
                _named_hop(fields.kwargs, rt.stage),
                attempt,
                f"stage call refused by worker {rt.worker_id}: {refused}; give every scheduler and worker the same "
                "REELFARM_SECRET (or the old one as REELFARM_PREVIOUS_SECRET while rotating), then `reelfarm retry "
                f"{job_id}`",
            ):
                log.error("job %s failed: its %s call was refused (%s)", job_id, rt.stage, refused)


def _named_hop(kwargs: dict[str, Any], kind: Stage) -> Hop:
    """The hop a refused call names, when it is one of this worker's kind (else the kind's own hop)."""
    try:
        hop = Hop(str(kwargs.get("stage")))
    except ValueError:
        return kind
    return hop if hop.kind is kind else kind
