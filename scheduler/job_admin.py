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
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from scheduler import jobs, keys, queues, worker_registry
from scheduler.jobs import JobNotFound, JobState
from scheduler.keys import Stage
from scheduler.rooms import Rooms, RoomState

RETRYABLE_STATES = frozenset({JobState.FAILED.value, JobState.CANCELLED.value})
CANCEL_REASON = "cancelled by user"
_READ_CHUNK = 1000

# Per-attempt fields a retry clears, so status, progress and reports show only the new attempt.
# ``<stage>.attempt`` is deliberately kept: the next attempt numbers are derived from it.
_STALE_FIELDS = [
    *(
        f"{stage.value}.{name}"
        for stage in Stage
        for name in ("state", "worker", "started_at", "finished_at", "seconds", "progress")
    ),
    "error",
    "result",
    "cancel_requested",
    "cancel_requested_at",
    "cancelled_at",
]
_RETRY_READ_FIELDS = ("state", "spec", *(f"{stage.value}.attempt" for stage in Stage))


class JobAdminError(ValueError):
    """An action the job's state does not allow; the message says why and what to do instead."""


# --------------------------------------------------------------------------- cancel

# KEYS: rq queue of the job's current stage, job record, delayed-retry set.
# ARGV: rq job id, stage, now, reason, job id.
# Returns 1 cancelled (was queued), 0 cancel requested (running), -1 no such job, -2 already finished.
_CANCEL = """
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return -1 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return -2 end
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
-- A stage waiting out a retry backoff sits in the delayed set, not in its queue.
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local ok, entry = pcall(cjson.decode, member)
  if ok and type(entry) == 'table' and entry['job_id'] == ARGV[5] then
    removed = removed + redis.call('ZREM', KEYS[3], member)
  end
end
if removed > 0 then
  redis.call('HSET', KEYS[2], 'state', 'cancelled', ARGV[2] .. '.state', 'cancelled',
             'error', ARGV[2] .. ': ' .. ARGV[4], 'cancelled_at', ARGV[3], 'updated_at', ARGV[3])
  return 1
end
redis.call('HSET', KEYS[2], 'cancel_requested', '1', 'cancel_requested_at', ARGV[3], 'updated_at', ARGV[3])
return 0
"""

# Sets the flag only on a job that can still stop; a finished job never carries a stale request.
_REQUEST = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
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
    fields = _hmget(conn, job_id, ("state", "stage", "spec", *(f"{s.value}.attempt" for s in Stage)))
    if fields["state"] is None:
        raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    stage = Stage(fields["stage"] or Stage.ENCODE.value)
    attempt = int(fields[f"{stage.value}.attempt"] or 1)
    spec = json.loads(fields["spec"] or "{}")
    queue = queues.stage_queue(conn, stage, spec.get("priority", "default"), spec.get("model", keys.DEFAULT_MODEL))
    rq_id = keys.stage_job_id(job_id, stage, attempt)
    now = repr(time.time())
    script_keys = (queue.key, keys.job_key(job_id), keys.delayed_key())
    got = int(conn.eval(_CANCEL, 3, *script_keys, rq_id, stage.value, now, CANCEL_REASON, job_id))  # type: ignore[arg-type]
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
    upstream = stage.previous
    if upstream is not None:
        release_input_room(conn, job_id, stage, int(fields[f"{upstream.value}.attempt"] or 1))
    return "cancelled"


def release_input_room(conn: redis.Redis, job_id: str, stage: Stage, upstream_attempt: int) -> None:
    """Give up ``stage``'s unclaimed input room: fail it and tell its producer to free the slot now.

    For a stage that will never run (cancelled while queued, or dequeued with a
    cancel requested); without it the producer holds the slot until its lease runs out.
    """
    upstream = stage.previous
    if upstream is None:
        return
    rooms = Rooms(conn)
    room_key = keys.room_key(job_id, upstream, upstream_attempt)
    producer = rooms.read(room_key).get("producer_id")
    if rooms.fail(room_key, "job cancelled before the next stage pulled it") is RoomState.FAILED and producer:
        conn.lpush(keys.acks_key(producer), room_key)


# --------------------------------------------------------------------------- retry


def next_stage_attempt(conn: Any, job_id: str, stage: Stage) -> int:
    """The attempt number to queue ``stage`` of ``job_id`` at: one more than the stage has ever used."""
    return int(conn.hget(keys.job_key(job_id), f"{stage.value}.attempt") or 0) + 1


def queue_retry(pipe: Any, conn: redis.Redis, job_id: str, fields: dict[str, str | None], *, secret: bytes) -> int:
    """Queue a retry of ``job_id`` from encode inside the caller's MULTI ``pipe``; returns the new attempt.

    ``fields`` is the record's ``state``, ``spec`` and ``<stage>.attempt`` values, read
    by the caller under WATCH so two retries can not both succeed.
    """
    attempt = max(int(fields.get(f"{stage.value}.attempt") or 0) for stage in Stage) + 1
    spec = json.loads(fields.get("spec") or "{}")
    key = keys.job_key(job_id)
    pipe.hdel(key, *_STALE_FIELDS)
    jobs.mark_stage_queued(pipe, job_id, Stage.ENCODE, attempt)
    # attempt_base: attempts below it belong to runs before this retry, so an attempt budget
    # (recovery's quarantine) can count only this run's attempts: ``used - attempt_base``.
    pipe.hset(
        key,
        mapping={"state": JobState.QUEUED.value, "retried_at": repr(time.time()), "attempt_base": str(attempt - 1)},
    )
    pipe.hincrby(key, "retries", 1)
    pipe.expire(key, jobs.JOB_RETENTION_SECONDS)
    queues.enqueue_stage(
        conn,
        job_id,
        Stage.ENCODE,
        attempt=attempt,
        upstream_attempt=None,
        priority=spec.get("priority", "default"),
        pipeline=pipe,
        model=spec.get("model", keys.DEFAULT_MODEL),
        secret=secret,
    )
    return attempt


def resubmit(conn: redis.Redis, job_id: str, *, secret: bytes) -> int:
    """Re-submit a failed or cancelled job from encode with a fresh attempt; returns the attempt number."""
    key = keys.job_key(job_id)
    with conn.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                values = pipe.hmget(key, _RETRY_READ_FIELDS)
                fields = dict(zip(_RETRY_READ_FIELDS, _decode(values), strict=True))
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


_ROW_FIELDS = ("state", "stage", "created_at", "updated_at", "spec", "error", "transform.progress", "cancel_requested")


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
        progress=fields["transform.progress"] or "",
        error=fields["error"] or "",
        cancel_requested=fields["cancel_requested"] == "1",
    )


def _read_rows(conn: redis.Redis, ids: list[str]) -> Iterator[JobRow]:
    for offset in range(0, len(ids), _READ_CHUNK):
        chunk = ids[offset : offset + _READ_CHUNK]
        pipe = conn.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job_key(job_id), _ROW_FIELDS)
        for job_id, values in zip(chunk, pipe.execute(), strict=True):
            fields = dict(zip(_ROW_FIELDS, _decode(values), strict=True))
            if fields["state"] is not None:  # expired since it was indexed
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
        from scheduler.batch import batch_job_ids

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


def count_states(conn: redis.Redis, job_ids: list[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for offset in range(0, len(job_ids), _READ_CHUNK):
        pipe = conn.pipeline(transaction=False)
        for job_id in job_ids[offset : offset + _READ_CHUNK]:
            pipe.hget(keys.job_key(job_id), "state")
        counts.update((v or b"expired").decode() for v in pipe.execute())
    return dict(counts)


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
    """Waiting stage jobs per stage, model and priority (one LLEN each, pipelined)."""
    combos = [(stage, model, priority) for stage in Stage for model in models for priority in keys.PRIORITIES]
    pipe = conn.pipeline(transaction=False)
    for stage, model, priority in combos:
        pipe.llen(queues.stage_queue(conn, stage, priority, model).key)
    counts = dict(zip(combos, pipe.execute(), strict=True))
    return [
        QueueRow(stage.value, model, {p: int(counts[(stage, model, p)]) for p in keys.PRIORITIES})
        for stage in Stage
        for model in models
    ]


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
                stage=record.get("stage", "?"),
                state=record.get("state", "?"),
                current_job=record.get("current_job", ""),
                model=model,
                device=record.get("device", "?"),
                heartbeat_age=max(0.0, now - float(record.get("last_heartbeat", now))),
                jobs_done=int(record.get("jobs_done", "0") or 0),
                free_slots=f"{record.get('free_slots', '?')}/{record.get('slots', '?')}",
                host=record.get("host", ""),
                receive=record.get("receive", "?"),
            )
        )
    order = {stage.value: i for i, stage in enumerate(Stage)}
    return sorted(rows, key=lambda r: (order.get(r.stage, 9), r.worker_id))
