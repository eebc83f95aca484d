"""Operating on jobs after submission: list, cancel, retry, and the farm overview behind ``reelfarm info``.

Cancel, for the stage a job is at:

1. queued -- one Lua script removes the stage's rq job from its queue and marks
   the record cancelled, so a worker can never dequeue a job that says
   cancelled, nor a cancelled record keep a queued stage. If the stage waited on
   an upstream room, the room is failed and its producer told to free the slot
   now rather than at lease expiry.
2. running (or just dequeued) -- the same script sets ``cancel_requested`` on
   the record instead; the worker checks ``is_cancel_requested`` at its step
   boundaries, stops, releases its rooms/slots and calls ``jobs.mark_cancelled``.

Retry (``resubmit``) re-queues a failed or cancelled job from encode with a
fresh attempt number higher than any stage of the job has used, because rq job
ids and room keys are per attempt (``keys.stage_job_id``, ``keys.room_key``):
reusing one would collide with the old attempt's leftovers. The record's
``<stage>.attempt`` fields are kept for exactly that reason; the next stage of a
retried job must be queued at ``next_stage_attempt``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from scheduler.core import jobs, keys, queues, worker_registry
from scheduler.core.job_record import (
    StageField,
    StageState,
    attempt_of,
    checkpoint_ref,
    kind_fields,
    kind_progress,
    lua_finished,
    read_records,
    routing_of,
    stage_fields,
)
from scheduler.core.job_retry import JobAdminError
from scheduler.core.jobs import JobNotFound, JobState
from scheduler.core.keys import Hop, Stage
from scheduler.core.output_keys import checkpoint_prefix
from scheduler.core.rooms import Rooms
from scheduler.core.route import ROUTE_FIELD
from scheduler.core.settings import FarmSettings

CANCEL_REASON = jobs.CANCEL_REASON

# --------------------------------------------------------------------------- cancel

# KEYS: rq queue of the job's current stage, job record, delayed-retry set, its parked calls.
# ARGV: rq job id, stage, now, reason, job id.
# Returns 1 cancelled (was queued), 0 cancel requested (running), -1 no such job, -2 already finished.
_CANCEL = f"""
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return -1 end
if {lua_finished("state")} then return -2 end
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
-- A stage waiting out a retry backoff is parked under its job id, not in its queue.
removed = removed + redis.call('ZREM', KEYS[3], ARGV[5])
redis.call('HDEL', KEYS[4], ARGV[5])
if removed > 0 then
  redis.call('HSET', KEYS[2], 'state', '{JobState.CANCELLED}', ARGV[2] .. '.{StageField.STATE}', '{StageState.CANCELLED}',
             'error', ARGV[2] .. ': ' .. ARGV[4], 'cancelled_at', ARGV[3], 'updated_at', ARGV[3])
  return 1
end
redis.call('HSET', KEYS[2], 'cancel_requested', '1', 'cancel_requested_at', ARGV[3], 'updated_at', ARGV[3])
return 0
"""

# Sets the flag only on a job that can still stop; a finished job never carries a stale request.
_REQUEST = f"""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if {lua_finished("state")} then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'cancel_requested_at', ARGV[1], 'updated_at', ARGV[1])
return 1
"""

CancelOutcome = Literal["cancelled", "requested", "finished"]


def request_cancel(conn: redis.Redis, job_id: str) -> bool:
    """Ask the worker running ``job_id`` to stop at its next step boundary; False if the job already finished."""
    got = conn.eval(_REQUEST, 1, keys.job_key(job_id), repr(time.time()))
    if int(got) == -1:  # type: ignore[arg-type]
        raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    return int(got) == 1  # type: ignore[arg-type]


def is_cancel_requested(conn: Any, job_id: str) -> bool:
    """Workers call this at stage start and step boundaries (one HGET); the flag itself lives in ``jobs``."""
    return jobs.cancel_requested(conn, job_id)


def cancel_job(conn: redis.Redis, job_id: str) -> CancelOutcome:
    """Cancel a queued job outright, or request that a running one stop; "finished" if there was nothing to stop."""
    fields = _hmget(conn, job_id, ("state", "stage", "spec", ROUTE_FIELD, *stage_fields(StageField.ATTEMPT)))
    if fields["state"] is None:
        raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    route = jobs.route_or_default(fields)
    try:
        stage = Hop(fields["stage"] or route.first)
    except ValueError:
        stage = route.first
    attempt = attempt_of(fields, stage) or 1
    routing = routing_of(fields["spec"])
    queue = queues.stage_queue(conn, stage, routing.priority, routing.model)
    rq_id = keys.stage_job_id(job_id, stage, attempt)
    now = repr(time.time())
    script_keys = (queue.key, keys.job_key(job_id), keys.delayed_key(), keys.delayed_calls_key())
    got = int(conn.eval(_CANCEL, 4, *script_keys, rq_id, stage.value, now, CANCEL_REASON, job_id))  # type: ignore[arg-type]
    if got == -1:
        raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    if got == -2:
        return "finished"
    if got == 0:
        return "requested"
    # The stage is out of its queue and the record says cancelled; tidy rq's own view of the job.
    rq_job = queue.fetch_job(rq_id)
    if rq_job is not None and not rq_job.is_canceled:
        rq_job.cancel()
    upstream = route.previous(stage) if stage in route else None
    if upstream is not None:
        Rooms(conn).release_input(job_id, upstream, attempt_of(fields, upstream) or 1)
    return "cancelled"


def cancel_jobs(conn: redis.Redis, job_ids: Iterable[str]) -> dict[CancelOutcome, int]:
    """Cancel each of ``job_ids`` (a batch's): how many were cancelled, asked to stop, or already finished."""
    counts: dict[CancelOutcome, int] = {"cancelled": 0, "requested": 0, "finished": 0}
    for job_id in job_ids:
        counts[cancel_job(conn, job_id)] += 1
    return counts


def drop_checkpoints(conn: redis.Redis, settings: FarmSettings, job_id: str) -> int:
    """Delete a cancelled job's checkpoints (a cancel leaves none); returns how many objects went.

    The store is only touched when the record names a checkpoint: a write still in flight finds the job
    cancelled and deletes its own object (``workers.checkpoints``), and a farm without checkpoints or
    without a reachable store can still cancel.
    """
    from scheduler.core.object_store import delete_objects_under

    fields = jobs.job_fields(conn, job_id)
    transform_hops = jobs.route_or_default(fields).of_kind(Stage.TRANSFORM)
    if all(
        checkpoint_ref(fields, hop, name) is None
        for hop in transform_hops
        for name in (StageField.CHECKPOINT, StageField.RESUME)
    ):
        return 0
    prefix = checkpoint_prefix(settings.checkpoints.key_prefix, job_id)
    return delete_objects_under(settings.s3.client(), settings.s3.bucket, prefix)


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class JobRow:
    job_id: str
    state: str
    stage: str
    created_at: float
    updated_at: float
    prompt: str
    progress: str
    error: str
    cancel_requested: bool


_TRANSFORM_PROGRESS = kind_fields(StageField.PROGRESS, Stage.TRANSFORM)
_ROW_FIELDS = ("state", "stage", "created_at", "updated_at", "spec", "error", *_TRANSFORM_PROGRESS, "cancel_requested")


_SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` or an ISO time -> epoch seconds."""
    now = time.time() if now is None else now
    match = _SINCE.match(text.strip().lower())
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise JobAdminError(f"--since {text!r}: use a duration like 30m, 1h, 2d or an ISO time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _decode(values: Iterable[bytes | str | None]) -> list[str | None]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _hmget(conn: Any, job_id: str, fields: tuple[str, ...]) -> dict[str, str | None]:
    return dict(zip(fields, _decode(conn.hmget(keys.job_key(job_id), fields)), strict=True))


def _row(job_id: str, fields: dict[str, str | None]) -> JobRow:
    prompt = ""
    if fields["spec"]:
        prompt = json.loads(fields["spec"]).get("prompt", "")
    return JobRow(
        job_id=job_id,
        state=fields["state"] or "?",
        stage=fields["stage"] or "",
        created_at=float(fields["created_at"] or 0),
        updated_at=float(fields["updated_at"] or 0),
        prompt=prompt,
        progress=kind_progress(fields, Stage.TRANSFORM) or "",
        error=fields["error"] or "",
        cancel_requested=fields["cancel_requested"] == "1",
    )


def _read_rows(conn: redis.Redis, ids: list[str]) -> Iterator[JobRow]:
    for job_id, fields in read_records(conn, ids, _ROW_FIELDS):
        if fields is not None and fields["state"] is not None:  # None: expired since it was indexed
            yield _row(job_id, fields)


def list_jobs(
    conn: redis.Redis,
    *,
    states: Iterable[str] = (),
    batch: str | None = None,
    since: float | None = None,
    limit: int | None = 200,
) -> list[JobRow]:
    """Jobs newest first (a batch's jobs in line order), filtered by state and submit time."""
    wanted = set(states)
    if batch is not None:
        from scheduler.ops.batch import batch_job_ids

        ids = batch_job_ids(conn, batch)
    else:
        low = "-inf" if since is None else repr(since)
        ids = [m.decode() for m in conn.zrevrangebyscore(keys.jobs_index_key(), "+inf", low)]  # type: ignore[union-attr]
    rows: list[JobRow] = []
    for row in _read_rows(conn, ids):
        if wanted and row.state not in wanted:
            continue
        if since is not None and row.created_at < since:
            continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


# --------------------------------------------------------------------------- farm overview


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    stage: str
    state: str
    current_job: str
    model: str
    device: str
    heartbeat_age: float
    jobs_done: int
    free_slots: str
    host: str
    decode_group: str = "-"  # "4:2x2:up": a decode worker's sharded VAE group (ranks, grid, health) ("-": none)
    receive: str = "?"  # "private" (TCP, into the stage's own tensors) or "slot" (registered, copied out)


@dataclass(frozen=True)
class QueueRow:
    stage: str
    model: str
    depths: dict[str, int]  # priority -> waiting stage jobs

    @property
    def total(self) -> int:
        return sum(self.depths.values())


def queue_rows(conn: redis.Redis, models: Iterable[str] = (keys.DEFAULT_MODEL,)) -> list[QueueRow]:
    """Waiting stage jobs per hop, model and priority (one LLEN each, pipelined); a part hop
    (``transform@high``) is shown where it has any."""
    hops = keys.all_hops()
    combos = [(stage, model, priority) for stage in hops for model in models for priority in keys.PRIORITIES]
    pipe = conn.pipeline(transaction=False)
    for stage, model, priority in combos:
        pipe.llen(queues.stage_queue(conn, stage, priority, model).key)
    counts = dict(zip(combos, pipe.execute(), strict=True))
    rows = [
        QueueRow(stage.value, model, {p: int(counts[(stage, model, p)]) for p in keys.PRIORITIES})
        for stage in hops
        for model in models
    ]
    return [row for row in rows if row.total or Hop(row.stage).part is None]


def worker_rows(conn: redis.Redis, now: float | None = None) -> list[WorkerRow]:
    now = time.time() if now is None else now
    rows = []
    for record in worker_registry.live_workers(conn):
        # "default" is the farm's model_dir: show that dir's name, which says more than "default".
        default_dir = record.get("model_dir", "").rstrip("/").rsplit("/", 1)[-1] or keys.DEFAULT_MODEL
        names = [n for n in record.get("models", keys.DEFAULT_MODEL).split(",") if n]
        model = ",".join(default_dir if n == keys.DEFAULT_MODEL else n for n in names)
        rows.append(
            WorkerRow(
                worker_id=record.get("worker_id", "?"),
                # An expert's transform worker shows the hop it serves (transform@high).
                stage=record.get("stage", "?") + (f"@{record['expert']}" if record.get("expert") else ""),
                state=record.get("state", "?"),
                current_job=record.get("current_job", ""),
                model=model,
                device=record.get("device", "?"),
                heartbeat_age=max(0.0, now - float(record.get("last_heartbeat", now))),
                jobs_done=int(record.get("jobs_done", "0") or 0),
                free_slots=f"{record.get('free_slots', '?')}/{record.get('slots', '?')}",
                host=record.get("host", ""),
                receive=record.get("receive", "?"),
                decode_group=(
                    f"{record['decode_ranks']}:{record.get('decode_grid', '?')}:{record.get('decode_group', '?')}"
                    if record.get("decode_ranks")
                    else "-"
                ),
            )
        )
    order = {stage.value: i for i, stage in enumerate(Stage)}
    return sorted(rows, key=lambda r: (order.get(r.stage, 9), r.worker_id))
