"""Recovery: where a job restarts when a stage attempt is lost, and the attempt budget that bounds it.

Every route back into the pipeline goes through ``restart_job``:

* a worker died mid-stage (found by the reaper through its lapsed heartbeat),
* a stage raised (retried with backoff),
* a consumer found its input room lost (producer gone, lease expired, transfer
  failed) -- lineage: the upstream stage is recomputed.

The restart point is the failed stage itself when its input room can still be
pulled -- or, for decode, when the transform's finished latents were
checkpointed (the record names the checkpoint; ``workers.checkpoints``) --
otherwise the nearest upstream stage whose input still exists (encode always
can: its input is the spec). A transform restarted that way resumes from its
last mid-denoise save, if it made one. Each stage has an attempt budget; a job
that exhausts it is quarantined -- FAILED with its whole failure history --
instead of looping. The attempt counter is also the fence: a restart bumps
``<stage>.attempt`` under WATCH, and a stale attempt that finishes later finds
the counter moved and discards its output (see ``workers.stage_job``).

Two things are not failures of the job and are kept apart from that budget:

* a preemption (a stopping worker hands its job back, ``preempted=True``): the
  attempt it queues is counted in ``<stage>.preempted`` and the job's
  ``preemptions``, not against ``max_attempts``; past ``max_preemptions`` the
  job fails with that reason;
* finished DiT work is never redone silently: a restart that would recompute a
  finished transform (its latents checkpoint is gone) says so in the record's
  ``recovery`` and adds the transform's seconds to ``keys.dit_recomputed_key``;
  a ``decode-from`` re-render (``decode_only``) fails instead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis

from scheduler.core import job_retry, jobs, keys, queues, worker_metrics, worker_registry
from scheduler.core.job_record import (
    Routing,
    StageField,
    StageState,
    attempt_of,
    checkpoint_ref,
    is_finished,
    routing_of,
    stage_field,
    stage_state_of,
)
from scheduler.core.jobs import route_or_default
from scheduler.core.keys import Hop, Stage
from scheduler.core.rooms import Rooms, RoomState
from scheduler.core.stage_calls import StageCall

log = logging.getLogger("reelfarm.recovery")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_PREEMPTIONS = 20
RECOMPUTED_DIT = "recomputed transform (checkpoint missing)"


@dataclass(frozen=True)
class RestartPlan:
    stage: Hop
    upstream_attempt: int | None


def input_room_available(conn: redis.Redis, job_id: str, stage: Hop, fields: dict[str, str]) -> int | None:
    """The attempt of ``stage``'s input room if it can still be pulled, else None."""
    upstream = route_or_default(fields).previous(stage)
    if upstream is None:
        return None
    attempt = attempt_of(fields, upstream)
    if attempt < 1 or stage_state_of(fields, upstream) != StageState.DONE:
        return None
    rooms = Rooms(conn)
    key = keys.room_key(job_id, upstream, attempt)
    room = rooms.read(key)
    if not room or int(room.get("state", "0")) not in (RoomState.PUBLISHED, RoomState.CLAIMED, RoomState.TRANSFERRING):
        return None
    if worker_registry.get_worker(conn, room.get("producer_id", "")) is None:
        return None
    lease = json.loads(room["descriptor"]).get("lease_expires_at", 0)
    return attempt if lease > time.time() else None


def checkpointed_input(stage: Hop, fields: dict[str, str]) -> int | None:
    """The transform attempt whose finished latents decode can read from a checkpoint, else None (never for
    other hops: a split route's first transform hop keeps its boundary state as a resume point instead)."""
    upstream = route_or_default(fields).previous(stage)
    if upstream is None or upstream.kind is not Stage.TRANSFORM or stage.kind is not Stage.DECODE:
        return None
    if stage_state_of(fields, upstream) != StageState.DONE:
        return None
    if checkpoint_ref(fields, upstream, StageField.CHECKPOINT) is None:
        return None
    return attempt_of(fields, upstream)


def plan_restart(conn: redis.Redis, job_id: str, failed: Hop, fields: dict[str, str]) -> RestartPlan:
    """Walk the job's route back from ``failed`` to the nearest hop whose input can still be had."""
    route = route_or_default(fields)
    stage: Hop = failed
    while (upstream := route.previous(stage)) is not None:
        attempt = input_room_available(conn, job_id, stage, fields)
        if attempt is None:
            attempt = checkpointed_input(stage, fields)
        if attempt is not None:
            return RestartPlan(stage, attempt)
        stage = upstream
    return RestartPlan(stage, None)


def recomputes_finished_dit(failed: Hop, plan: RestartPlan, fields: dict[str, str]) -> bool:
    """True when restarting at ``plan.stage`` would run the job's finished DiT loop again: the route's last
    transform hop (the one decode reads) is done and the restart walks back past it. A split loop's first
    hop being done is no finished DiT: it resumes from its saved boundary state."""
    route = route_or_default(fields)
    finished = route.previous(route.last)
    if finished is None or stage_state_of(fields, finished) != StageState.DONE:
        return False
    stage: Hop | None = failed
    while stage is not None and stage != plan.stage:
        stage = route.previous(stage)
        if stage == finished:
            return True
    return False


def restart_job(
    conn: redis.Redis,
    job_id: str,
    failed: Hop,
    failed_attempt: int,
    reason: str,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    delay_seconds: float = 0.0,
    worker_id: str = "",
    preempted: bool = False,
    max_preemptions: int = DEFAULT_MAX_PREEMPTIONS,
    secret: bytes,
) -> str:
    """Record the failure and restart the job, or quarantine it; returns what happened, for logs.

    ``preempted``: the worker handed the job back because it is stopping (not the job's fault), so the
    restart is not charged to ``max_attempts``; the job fails once it was preempted more than
    ``max_preemptions`` times. Idempotent per failed attempt: if the stage's attempt counter already
    moved past ``failed_attempt`` (another path recovered it), nothing is done.
    """
    key = keys.job_key(job_id)
    member = keys.inflight_member(job_id, failed, failed_attempt)
    while True:
        with conn.pipeline() as pipe:
            try:
                pipe.watch(key)
                fields = jobs.job_fields(pipe, job_id)
                if not fields or is_finished(fields):
                    pipe.unwatch()
                    conn.zrem(keys.inflight_key(), member)
                    return "job already finished"
                if attempt_of(fields, failed) != failed_attempt:
                    pipe.unwatch()
                    conn.zrem(keys.inflight_key(), member)
                    return "already recovered"
                plan = plan_restart(conn, job_id, failed, fields)
                used = attempt_of(fields, plan.stage)
                failure = {
                    "stage": failed.value,
                    "attempt": failed_attempt,
                    "worker": worker_id or fields.get(stage_field(failed, StageField.WORKER), ""),
                    "reason": reason,
                    "at": time.time(),
                }
                history = json.loads(fields.get("failures", "[]")) + [failure]
                preemptions = int(fields.get("preemptions") or 0) + int(preempted)
                # A user's retry (`reelfarm retry`) starts a fresh budget above the attempts already used;
                # attempts a preemption queued are free.
                charged = (
                    used
                    - int(fields.get("attempt_base", "0"))
                    - int(fields.get(stage_field(plan.stage, StageField.PREEMPTED)) or 0)
                )
                recomputes_dit = recomputes_finished_dit(failed, plan, fields)
                pipe.multi()
                pipe.zrem(keys.inflight_key(), member)
                pipe.hset(key, "failures", json.dumps(history))
                if preempted:
                    pipe.hset(key, "preemptions", str(preemptions))
                if preempted and preemptions > max_preemptions:
                    jobs.mark_failed(
                        pipe,
                        job_id,
                        failed,
                        f"preempted {preemptions} times, more than worker.max_preemptions ({max_preemptions}): "
                        "give the farm workers that stay up, or raise worker.max_preemptions",
                    )
                    outcome = "failed: preempted too often"
                elif not preempted and charged >= max_attempts:
                    summary = "; ".join(f"{f['stage']}#{f['attempt']}: {f['reason']}" for f in history[-max_attempts:])
                    jobs.mark_failed(
                        pipe,
                        job_id,
                        failed,
                        f"quarantined after {charged} attempts of {plan.stage.value} ({summary})",
                    )
                    outcome = "quarantined"
                elif recomputes_dit and fields.get("decode_only") == "1":
                    jobs.mark_failed(
                        pipe,
                        job_id,
                        failed,
                        f"{reason}; a decode-from re-render never recomputes the DiT: keep checkpoints with "
                        f"checkpoints.retention_days > 0, or run `reelfarm decode-from {job_id} --allow-recompute`",
                    )
                    outcome = "failed: decode-only, checkpoint gone"
                else:
                    if preempted:
                        pipe.hincrby(key, stage_field(plan.stage, StageField.PREEMPTED), 1)
                    if recomputes_dit:
                        note_recomputed_dit(pipe, job_id, fields)
                    enqueue_later(
                        conn,
                        pipe,
                        StageCall(job_id, plan.stage, used + 1, plan.upstream_attempt),
                        # An unreadable spec routes to the defaults; the restarted stage fails it with the reason.
                        routing_of(fields.get("spec")),
                        delay_seconds,
                        secret=secret,
                    )
                    outcome = f"restarted at {plan.stage.value} attempt {used + 1}"
                pipe.execute()
            except redis.WatchError:
                continue
        log.warning("job %s: %s failed (%s); %s", job_id, failed.value, reason, outcome)
        if outcome.startswith("restarted"):
            worker_metrics.count_retry(failed)
        return outcome


def note_recomputed_dit(pipe: redis.client.Pipeline, job_id: str, fields: dict[str, str]) -> None:
    """Say in the record that finished DiT work is being redone, and count its seconds farm-wide."""
    pipe.hset(keys.job_key(job_id), "recovery", RECOMPUTED_DIT)
    transform_hops = route_or_default(fields).of_kind(Stage.TRANSFORM)
    seconds = sum(float(fields.get(stage_field(hop, StageField.SECONDS)) or 0.0) for hop in transform_hops)
    pipe.incrbyfloat(keys.dit_recomputed_key(), seconds)


def enqueue_later(
    conn: redis.Redis,
    pipe: redis.client.Pipeline,
    call: StageCall,
    routing: Routing,
    delay_seconds: float,
    *,
    secret: bytes,
) -> None:
    """Queue ``call`` now (signed with ``secret``), or park it for the reaper to release when its backoff ends.

    Parked calls are keyed by job id (a job has at most one stage waiting out a backoff), so a cancel
    removes one member instead of decoding the whole set.
    """
    if delay_seconds <= 0:
        job_retry.queue_stage(pipe, conn, call, routing, secret=secret)
        return
    jobs.mark_stage_queued(pipe, call.job_id, call.stage, call.attempt)
    parked = {**call.kwargs(), "priority": routing.priority, "model": routing.model}
    pipe.zadd(keys.delayed_key(), {call.job_id: time.time() + delay_seconds})
    pipe.hset(keys.delayed_calls_key(), call.job_id, json.dumps(parked, sort_keys=True))


def _parked_call(raw: bytes | None) -> tuple[StageCall, Routing] | None:
    try:
        entry = json.loads(raw or b"")
        call = StageCall(entry["job_id"], Hop(entry["stage"]), int(entry["attempt"]), entry["upstream_attempt"])
        return call, Routing(entry["priority"], entry["model"])
    except (ValueError, KeyError, TypeError):
        return None


def release_due(conn: redis.Redis, now: float | None = None, *, secret: bytes) -> int:
    """Move parked calls whose backoff has passed onto their queues, signed with ``secret``; safe to run
    from many processes."""
    released = 0
    due: list[bytes] = conn.zrangebyscore(keys.delayed_key(), "-inf", now or time.time())  # type: ignore[assignment]
    for raw_id in due:
        job_id = raw_id.decode()
        with conn.pipeline() as pipe:
            try:
                # Remove and enqueue in one transaction: a crash between them must not lose the retry.
                pipe.watch(keys.delayed_key())
                if pipe.zscore(keys.delayed_key(), job_id) is None:
                    continue
                parked = _parked_call(pipe.hget(keys.delayed_calls_key(), job_id))  # type: ignore[arg-type]
                pipe.multi()
                pipe.zrem(keys.delayed_key(), job_id)
                pipe.hdel(keys.delayed_calls_key(), job_id)
                if parked is None:
                    log.error("job %s: its parked retry is unreadable; dropped", job_id)
                else:
                    # The record already says queued (enqueue_later marked it): only rq's side is left.
                    queues.enqueue_stages(conn, [parked], pipeline=pipe, secret=secret)
                    released += 1
                pipe.execute()
            except redis.WatchError:
                continue
    return released
