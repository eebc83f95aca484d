"""Re-queueing a job's hops: a stage call into its queue (with its record saying so), the next attempt of a
hop, and the retry of a failed or cancelled job from the first hop whose output it no longer has."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from scheduler.core import keys, queues
from scheduler.core.errors import UserError
from scheduler.core.job_record import Routing, StageField, attempt_of, routing_of, stage_field, stage_fields
from scheduler.core.jobs import (
    JOB_RETENTION_SECONDS,
    JobNotFound,
    JobState,
    mark_stage_queued,
    route_or_default,
    stage_attempt,
)
from scheduler.core.keys import Hop
from scheduler.core.route import ROUTE_FIELD
from scheduler.core.stage_calls import StageCall


class JobAdminError(UserError, ValueError):
    """An action the job's state does not allow; the message says why and what to do instead."""


RETRYABLE_STATES = frozenset({JobState.FAILED.value, JobState.CANCELLED.value})
# Per-attempt fields a retry clears, so status, progress and reports show only the new attempt.
# ``<stage>.attempt`` is deliberately kept: the next attempt numbers are derived from it.
_STALE_FIELDS = [
    *(stage_field(stage, name) for stage in keys.all_hops() for name in StageField if name is not StageField.ATTEMPT),
    "error",
    "result",
    "cancel_requested",
    "cancel_requested_at",
    "cancelled_at",
    "decode_only",
    "preemptions",
    "recovery",
]
_RETRY_READ_FIELDS = ("state", "spec", ROUTE_FIELD, *stage_fields(StageField.ATTEMPT))


# --------------------------------------------------------------------------- queueing and retry


def queue_stages(pipe: Any, conn: redis.Redis, calls: Sequence[tuple[StageCall, Routing]], *, secret: bytes) -> None:
    """How a stage attempt of an existing job enters the pipeline (a new job's first one: ``create_jobs``):
    mark it queued in its job record and put its signed call on the queue for its priority and model, both
    in the caller's MULTI ``pipe``."""
    for call, _ in calls:
        mark_stage_queued(pipe, call.job_id, call.stage, call.attempt)
    queues.enqueue_stages(conn, calls, pipeline=pipe, secret=secret)


def queue_stage(pipe: Any, conn: redis.Redis, call: StageCall, routing: Routing, *, secret: bytes) -> None:
    queue_stages(pipe, conn, [(call, routing)], secret=secret)


def next_stage_attempt(conn: Any, job_id: str, stage: Hop) -> int:
    """The attempt number to queue ``stage`` of ``job_id`` at: one more than the stage has ever used."""
    return stage_attempt(conn, job_id, stage) + 1


def queue_retry(pipe: Any, conn: redis.Redis, job_id: str, fields: dict[str, str | None], *, secret: bytes) -> int:
    """Queue a retry of ``job_id`` from encode inside the caller's MULTI ``pipe``; returns the new attempt.

    ``fields`` is the record's ``state``, ``spec`` and ``<stage>.attempt`` values, read
    by the caller under WATCH so two retries can not both succeed.
    """
    route = route_or_default(fields)
    attempt = max(attempt_of(fields, stage) for stage in keys.all_hops()) + 1
    key = keys.job_key(job_id)
    pipe.hdel(key, *_STALE_FIELDS)
    # attempt_base: attempts below it belong to runs before this retry, so an attempt budget
    # (recovery's quarantine) can count only this run's attempts: ``used - attempt_base``.
    pipe.hset(
        key,
        mapping={"state": JobState.QUEUED.value, "retried_at": repr(time.time()), "attempt_base": str(attempt - 1)},
    )
    pipe.hincrby(key, "retries", 1)
    pipe.expire(key, JOB_RETENTION_SECONDS)
    queue_stage(pipe, conn, StageCall(job_id, route.first, attempt, None), routing_of(fields.get("spec")), secret=secret)
    return attempt


def resubmit(conn: redis.Redis, job_id: str, *, secret: bytes) -> int:
    """Re-submit a failed or cancelled job from encode with a fresh attempt; returns the attempt number."""
    key = keys.job_key(job_id)
    with conn.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                values = pipe.hmget(key, _RETRY_READ_FIELDS)
                fields = dict(
                    zip(_RETRY_READ_FIELDS, (v.decode() if isinstance(v, bytes) else v for v in values), strict=True)
                )
                state = fields["state"]
                if state is None:
                    raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
                if state not in RETRYABLE_STATES:
                    raise JobAdminError(
                        f"job {job_id} is {state}: only failed or cancelled jobs can be retried"
                        + (" (cancel it first)" if state != JobState.SUCCEEDED.value else "")
                    )
                pipe.multi()
                attempt = queue_retry(pipe, conn, job_id, fields, secret=secret)
                pipe.execute()
                return attempt
            except redis.WatchError:
                # Someone changed the job between our read and EXEC (another retry, a worker): decide again.
                continue
