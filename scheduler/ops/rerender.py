"""``reelfarm decode-from``: re-render a finished job's video from its latents checkpoint, never silently the DiT.

1. read the record; refuse unless the job is finished
2. ask the object store whether the checkpoint the record names still exists (completion deletes it
   unless ``checkpoints.retention_days`` keeps it)
3. gone and recompute not allowed: refuse in one line, nothing written or queued
4. present: queue a decode attempt (marked ``decode_only``, so no recovery path recomputes the DiT);
   gone and ``allow_recompute``: queue the job again from encode, the record saying the DiT was recomputed
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import redis
from pydantic import ValidationError

from scheduler.core import job_retry, jobs, keys, recovery
from scheduler.core.job_record import StageField, StageState, attempt_of, checkpoint_ref, routing_of, stage_field
from scheduler.core.job_retry import JobAdminError
from scheduler.core.jobs import JobNotFound, JobState
from scheduler.core.keys import Hop, Stage
from scheduler.core.spec import CodecOptions, JobSpec
from scheduler.core.stage_calls import StageCall


class Rerender(NamedTuple):
    """What ``decode_from`` queued: a decode attempt from the checkpoint, or (allowed) the whole job again."""

    stage: Stage
    attempt: int


def decode_from(
    conn: redis.Redis,
    job_id: str,
    codec: dict[str, Any] | None,
    *,
    secret: bytes,
    checkpoint_exists: Callable[[str], bool],
    allow_recompute: bool = False,
) -> Rerender:
    """Re-render a finished job's video from its latents checkpoint: a new decode attempt only, no DiT.

    ``codec`` (``{"name": ..., "crf": ...}``) replaces the spec's codec for this and later renders. The
    video lands at the job's usual (deterministic) key, replacing the old one. ``checkpoint_exists(key)``
    asks the object store: the record may still name a checkpoint that completion deleted
    (``checkpoints.retention_days`` 0), and queueing a decode that cannot read it would fall back to
    recomputing the DiT. Without ``allow_recompute`` that is refused here, before anything is queued, and
    the queued decode is marked ``decode_only`` so no later recovery recomputes the DiT either; with it, a
    job whose checkpoint is gone is queued again from encode and its record says the DiT was recomputed.
    """
    key = keys.job_key(job_id)
    fields = jobs.job_fields(conn, job_id)
    if not fields:
        raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    missing = _missing_checkpoint(job_id, fields, checkpoint_exists)
    if missing and not allow_recompute:
        raise JobAdminError(
            f"job {job_id}: {missing}, so decode-from would recompute the DiT; nothing was queued: set "
            "checkpoints.retention_days > 0 to keep checkpoints of future jobs, or pass --allow-recompute"
        )

    def queue_render(pipe: redis.client.Pipeline) -> Rerender:
        fields = jobs.job_fields(pipe, job_id)  # type: ignore[arg-type]
        if not fields:
            raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
        if missing:
            spec_json = _rerender_spec(job_id, fields, codec)
            pipe.multi()
            attempt = job_retry.queue_retry(pipe, conn, job_id, {**fields, "spec": spec_json}, secret=secret)
            pipe.hset(key, "spec", spec_json)
            recovery.note_recomputed_dit(pipe, job_id, fields)
            return Rerender(Stage.ENCODE, attempt)
        call, spec_json = _decode_from_call(job_id, fields, codec)
        pipe.multi()
        pipe.hdel(key, "result", "error", *(stage_field(Stage.DECODE, f) for f in _DECODE_STALE))
        pipe.hset(
            key,
            mapping={
                "state": JobState.QUEUED.value,
                "spec": spec_json,
                "redecoded_at": repr(time.time()),
                "decode_only": "1",
            },
        )
        job_retry.queue_stage(pipe, conn, call, routing_of(spec_json), secret=secret)
        return Rerender(Stage.DECODE, call.attempt)

    # redis-py's transaction() re-runs the read-decide-write under WATCH until nobody changed the job meanwhile.
    # (typeshed declares the callable as returning None, though value_from_callable returns its value.)
    return conn.transaction(queue_render, key, value_from_callable=True)  # type: ignore[arg-type,return-value]


# A new decode attempt shows only its own story; ``decode.attempt`` stays (the next attempt number).
_DECODE_STALE = [f for f in StageField if f is not StageField.ATTEMPT]


def _missing_checkpoint(job_id: str, fields: dict[str, str], checkpoint_exists: Callable[[str], bool]) -> str | None:
    """Why the job has no latents checkpoint to decode from, or None when it has one."""
    _finished_for_rerender(job_id, fields)
    last_transform = _last_transform(fields)
    ref = checkpoint_ref(fields, last_transform, StageField.CHECKPOINT)
    if ref is None or fields.get(stage_field(last_transform, StageField.STATE)) != StageState.DONE:
        return "it has no latents checkpoint"
    if not checkpoint_exists(ref.key):
        # The usual cause: completion deletes checkpoints unless retention keeps them.
        return (
            f"its latents checkpoint {ref.key} is gone (deleted when the video completed: "
            "checkpoints.retention_days is 0 by default)"
        )
    return None


def _finished_for_rerender(job_id: str, fields: dict[str, str]) -> None:
    state = fields.get("state")
    if state not in (JobState.SUCCEEDED.value, JobState.FAILED.value):
        raise JobAdminError(f"job {job_id} is {state}: decode-from re-renders finished jobs only (wait for it first)")


def _decode_from_call(job_id: str, fields: dict[str, str], codec: dict[str, Any] | None) -> tuple[StageCall, str]:
    _finished_for_rerender(job_id, fields)
    last_transform = _last_transform(fields)
    ref = checkpoint_ref(fields, last_transform, StageField.CHECKPOINT)
    if ref is None or fields.get(stage_field(last_transform, StageField.STATE)) != StageState.DONE:
        raise JobAdminError(
            f"job {job_id} has no latents checkpoint (they are kept after completion only with "
            f"checkpoints.retention_days > 0); re-render it with `reelfarm retry {job_id}` instead"
        )
    last = jobs.route_or_default(fields).last
    attempt = attempt_of(fields, last) + 1
    return StageCall(job_id, last, attempt, ref.attempt), _rerender_spec(job_id, fields, codec)


def _last_transform(fields: dict[str, str]) -> Hop:
    """The hop whose finished latents decode reads: the route's hop before decode (transform@low when split)."""
    route = jobs.route_or_default(fields)
    return route.previous(route.last) or Stage.TRANSFORM


def _rerender_spec(job_id: str, fields: dict[str, str], codec: dict[str, Any] | None) -> str:
    """The job's spec as JSON with ``codec`` applied; a bad codec is a one-line ``JobAdminError``."""
    try:
        spec = JobSpec.model_validate_json(fields.get("spec", ""))
        if codec:
            spec = spec.model_copy(update={"codec": CodecOptions.model_validate({**spec.codec.model_dump(), **codec})})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        raise JobAdminError(
            f"decode-from {job_id}: {where}: {first['msg']} (see `reelfarm decode-from --help`)"
        ) from None
    return spec.to_json()
