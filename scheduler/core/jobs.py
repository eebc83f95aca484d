"""The job record's reads and writes: one Redis hash per job holding its spec, state, per-stage story and result.

Field names and states are ``scheduler.core.job_record``'s (re-exported here:
``JobState``, ``StageState``). Writes accept a caller's pipeline so a stage
finishing and the next stage being enqueued land together.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from scheduler.core import keys, queues
from scheduler.core.errors import UserError
from scheduler.core.job_record import (
    JobState,
    Routing,
    StageField,
    StageState,
    lua_finished,
    stage_field,
)
from scheduler.core.keys import Hop, Stage
from scheduler.core.route import ROUTE_FIELD, THREE_HOPS, Route, route_of
from scheduler.core.spec import JobSpec
from scheduler.core.stage_calls import StageCall

__all__ = ["JobState", "StageState", "JobNotFound"]

JOB_RETENTION_SECONDS = 30 * 24 * 3600
CANCEL_REASON = "cancelled by user"
_STATE = StageField.STATE
_ATTEMPT = StageField.ATTEMPT


class JobNotFound(UserError, LookupError):
    pass


def _now() -> str:
    return repr(time.time())


def create_jobs(
    pipe: Any,
    conn: redis.Redis,
    new_jobs: Sequence[tuple[str, JobSpec]],
    *,
    secret: bytes,
    routes: Callable[[JobSpec], Route] | None = None,
) -> None:
    """New jobs enter the pipeline, in the caller's MULTI ``pipe``: each record written whole -- spec, state,
    route (``routes(spec)``, `scheduler.core.model_catalog.ModelChooser.route`; three hops without one) and
    its first hop already queued, in one HSET -- indexed, and its signed encode call enqueued.

    One write per record rather than ``queue_stage``'s second one: a 10,000-line batch pays for every command.
    """
    now = time.time()
    calls = []
    for job_id, spec in new_jobs:
        key = keys.job_key(job_id)
        route = THREE_HOPS if routes is None else routes(spec)
        record = {
            "spec": spec.to_json(),
            "state": JobState.QUEUED.value,
            "created_at": repr(now),
            # Kept with the job, so workers, recovery and views follow the route it was submitted with even if
            # the farm's settings change meanwhile (a record without one, from before routes, reads as 3 hops).
            ROUTE_FIELD: route.to_json(),
        }
        pipe.hset(key, mapping={**record, **_queued_fields(route.first, 1, now)})
        pipe.expire(key, JOB_RETENTION_SECONDS)
        calls.append((StageCall(job_id, route.first, 1, None), Routing(spec.priority, spec.model)))
    if new_jobs:
        pipe.zadd(keys.jobs_index_key(), dict.fromkeys((job_id for job_id, _ in new_jobs), now))
    queues.enqueue_stages(conn, calls, pipeline=pipe, secret=secret)


def job_exists(conn: redis.Redis, job_id: str) -> bool:
    return bool(conn.exists(keys.job_key(job_id)))


def _queued_fields(stage: Hop, attempt: int, now: float) -> dict[str, str]:
    """What the record says of a stage attempt waiting in its queue."""
    return {
        "stage": stage.value,
        stage_field(stage, _STATE): StageState.QUEUED.value,
        stage_field(stage, _ATTEMPT): str(attempt),
        "updated_at": repr(now),
    }


def mark_stage_queued(pipe: Any, job_id: str, stage: Hop, attempt: int) -> None:
    pipe.hset(keys.job_key(job_id), mapping=_queued_fields(stage, attempt, time.time()))


# Start a stage attempt only if it is still the queued one: a second rq copy of the same attempt
# (a stranded dequeue put back, an operator's requeue) then finds it running and skips, so one
# attempt never runs twice. KEYS: job, inflight. ARGV: stage, attempt, worker, now, inflight member.
_START_STAGE = f"""
local state, stage_state, attempt = unpack(redis.call('HMGET', KEYS[1], 'state', ARGV[1] .. '.{_STATE}',
  ARGV[1] .. '.{_ATTEMPT}'))
if {lua_finished("state")} then return 0 end
if stage_state == '{StageState.RUNNING}' or stage_state == '{StageState.DONE}' or attempt ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], 'state', '{JobState.RUNNING}', 'stage', ARGV[1], ARGV[1] .. '.{_STATE}', '{StageState.RUNNING}',
  ARGV[1] .. '.{StageField.WORKER}', ARGV[3], ARGV[1] .. '.{StageField.STARTED_AT}', ARGV[4], 'updated_at', ARGV[4])
return 1
"""


def mark_stage_started(conn: Any, job_id: str, stage: Hop, worker_id: str, attempt: int) -> bool:
    """Record who runs this attempt and list it as in flight, so the reaper notices if that worker dies.

    Returns False (and changes nothing) when ``attempt`` is not the stage's current attempt, when
    that attempt already started or finished, or when the job is finished.
    """
    now = _now()
    started = conn.eval(
        _START_STAGE,
        2,
        keys.job_key(job_id),
        keys.inflight_key(),
        stage.value,
        str(attempt),
        worker_id,
        now,
        keys.inflight_member(job_id, stage, attempt),
    )
    return bool(started)


def set_progress(conn: Any, job_id: str, stage: Hop, done: int, total: int) -> None:
    """Step ``done`` of ``total`` is computed: shown as progress, and counted in ``<stage>.steps_computed``
    (which a resumed attempt only adds its own steps to, so the record says how often the DiT really ran)."""
    key = keys.job_key(job_id)
    # Not MULTI/EXEC: two more commands a step for nothing -- both writes are progress bookkeeping, sent in
    # one write on one connection, and Redis runs them back to back; neither fences anything.
    pipe = conn.pipeline(transaction=False)
    pipe.hset(key, mapping={stage_field(stage, StageField.PROGRESS): f"{done}/{total}", "updated_at": _now()})
    pipe.hincrby(key, stage_field(stage, StageField.STEPS_COMPUTED), 1)
    pipe.execute()


class ProgressWrites:
    """A denoising loop's ``on_step`` / ``should_stop`` pair over one job record: 3 commands a step (the
    progress write without MULTI/EXEC, then the cancel flag). The cancel flag is read fresh before every
    step, not with the progress write: a checkpoint save or a pause may come between the two, and a cancel
    in that gap must stop the very next step."""

    def __init__(self, conn: Any, job_id: str, stage: Hop) -> None:
        self.conn, self.job_id, self.stage = conn, job_id, stage

    def on_step(self, done: int, total: int) -> None:
        set_progress(self.conn, self.job_id, self.stage, done, total)

    def should_stop(self) -> bool:
        return cancel_requested(self.conn, self.job_id)


def set_recovery(conn: Any, job_id: str, stage: Hop, how: str) -> None:
    """Say how this attempt of ``stage`` got its input or starting point (``reelfarm status`` shows it)."""
    conn.hset(keys.job_key(job_id), stage_field(stage, StageField.RECOVERY), how)


# Name a checkpoint in the record only while the attempt that wrote it is current and the job unfinished
# (or, when retention keeps checkpoints, succeeded: a fast decode may finish before the write); otherwise
# the writer deletes the object, as a cancel or completion may already have cleaned up.
# KEYS: job. ARGV: stage, attempt, field, value, "1" if a succeeded job may still take it.
_RECORD_CHECKPOINT = f"""
local state, attempt = unpack(redis.call('HMGET', KEYS[1], 'state', ARGV[1] .. '.{_ATTEMPT}'))
if not state or attempt ~= ARGV[2] then return 0 end
if {lua_finished("state")} and not (state == '{JobState.SUCCEEDED}' and ARGV[5] == '1') then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
"""


def forget_checkpoint(conn: Any, job_id: str, stage: Hop, name: StageField) -> None:
    """Drop a checkpoint the record names that turned out unusable, so recovery falls back to lineage."""
    conn.hdel(keys.job_key(job_id), stage_field(stage, name))


def record_checkpoint(
    conn: Any, job_id: str, stage: Hop, attempt: int, name: StageField, value: str, *, kept: bool = False
) -> bool:
    """Store ``value`` (a ``CheckpointRef`` as JSON) in ``<stage>.<name>`` if ``attempt`` is current and the job
    unfinished -- or succeeded, when ``kept`` (retention keeps checkpoints after completion); True if stored."""
    field = stage_field(stage, name)
    args = (stage.value, str(attempt), field, value, "1" if kept else "0")
    return bool(conn.eval(_RECORD_CHECKPOINT, 1, keys.job_key(job_id), *args))


def set_dit_report(conn: Any, job_id: str, report: dict[str, Any], hop: Hop = Stage.TRANSFORM) -> None:
    """How the transform hop ran the DiT for this job (options and call counts), beside its timings."""
    conn.hset(keys.job_key(job_id), stage_field(hop, StageField.DIT), json.dumps(report, sort_keys=True))


def mark_stage_finished(
    pipe: Any,
    job_id: str,
    stage: Hop,
    attempt: int,
    seconds: float,
    compute_seconds: float | None = None,
    pulled: tuple[int, float] | None = None,
) -> None:
    """The stage attempt is done: its span, the model's share of it, and the hand-off it pulled (bytes, seconds)."""
    pipe.zrem(keys.inflight_key(), keys.inflight_member(job_id, stage, attempt))
    fields = {
        stage_field(stage, _STATE): StageState.DONE.value,
        stage_field(stage, StageField.FINISHED_AT): _now(),
        stage_field(stage, StageField.SECONDS): f"{seconds:.3f}",
        "updated_at": _now(),
    }
    if compute_seconds is not None:
        fields[stage_field(stage, StageField.COMPUTE_SECONDS)] = f"{compute_seconds:.4f}"
    if pulled is not None:
        fields[stage_field(stage, StageField.INPUT_BYTES)] = str(pulled[0])
        fields[stage_field(stage, StageField.PULL_SECONDS)] = f"{pulled[1]:.4f}"
    pipe.hset(keys.job_key(job_id), mapping=fields)


def mark_succeeded(pipe: Any, job_id: str, result: dict[str, Any]) -> None:
    pipe.hset(
        keys.job_key(job_id),
        mapping={"state": JobState.SUCCEEDED.value, "result": json.dumps(result), "updated_at": _now()},
    )


def _mark_ended(conn: Any, job_id: str, stage: Hop, state: JobState, reason: str) -> None:
    conn.hset(
        keys.job_key(job_id),
        mapping={
            "state": state.value,
            "error": f"{stage.value}: {reason}",
            stage_field(stage, _STATE): StageState(state.value).value,
            "updated_at": _now(),
        },
    )


def mark_failed(conn: Any, job_id: str, stage: Hop, reason: str) -> None:
    """Terminal failure (after the attempt budget, or a refusal no retry can fix)."""
    _mark_ended(conn, job_id, stage, JobState.FAILED, reason)


# Fail a stage attempt only while the farm is still waiting for it to start. KEYS: job.
# ARGV: stage, attempt, error, now.
_FAIL_WAITING = f"""
local state, stage_state, attempt = unpack(redis.call('HMGET', KEYS[1], 'state', ARGV[1] .. '.{_STATE}',
  ARGV[1] .. '.{_ATTEMPT}'))
if not state or {lua_finished("state")} then return 0 end
if stage_state ~= '{StageState.QUEUED}' or attempt ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', '{JobState.FAILED}', 'error', ARGV[1] .. ': ' .. ARGV[3],
  ARGV[1] .. '.{_STATE}', '{StageState.FAILED}', 'updated_at', ARGV[4])
return 1
"""


def fail_if_waiting(conn: redis.Redis, job_id: str, stage: Hop, attempt: int, reason: str) -> bool:
    """Fail the job if ``attempt`` of ``stage`` is the one it waits on and it has not started; True if it did."""
    return bool(conn.eval(_FAIL_WAITING, 1, keys.job_key(job_id), stage.value, str(attempt), reason, _now()))


def load_spec(conn: redis.Redis, job_id: str) -> JobSpec:
    raw = conn.hget(keys.job_key(job_id), "spec")
    if raw is None:
        raise JobNotFound(f"job {job_id} not found")
    return JobSpec.model_validate_json(raw)  # type: ignore[arg-type]


def spec_in(fields: dict[str, str], job_id: str) -> JobSpec:
    """The spec inside a job record already read (``job_fields``): one round trip fewer than ``load_spec``."""
    if "spec" not in fields:
        raise JobNotFound(f"job {job_id} not found")
    return JobSpec.model_validate_json(fields["spec"])


def cancel_requested_in(fields: dict[str, str]) -> bool:
    """``cancel_requested``, read from a job record already read."""
    return "cancel_requested" in fields


def _json_or_raw(text: str) -> Any:
    # A record planted by hand may hold anything: show it rather than crash the status view.
    try:
        return json.loads(text)
    except ValueError:
        return {"unreadable": text[:200]}


def read_status(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    """The job as users see it: state, per-stage story, result or error."""
    fields = job_fields(conn, job_id)
    if not fields:
        raise JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    stages: dict[str, dict[str, Any]] = {}
    route = route_or_default(fields)
    for stage in route.names:
        entry: dict[str, Any] = {
            name.split(".", 1)[1]: value for name, value in fields.items() if name.startswith(stage.value + ".")
        }
        steps = route.steps_of(stage)
        if steps is not None:
            entry["steps"] = list(steps)
        if StageField.DIT.value in entry:
            entry[StageField.DIT.value] = _json_or_raw(entry[StageField.DIT.value])
        if entry:
            stages[stage.value] = entry
    spec = _json_or_raw(fields.get("spec", "null"))
    return {
        "job_id": job_id,
        "state": fields.get("state"),
        "note": waiting_note(conn, fields, spec),
        "stage": fields.get("stage"),
        "route": [hop.value for hop in route.names],
        "created_at": float(fields.get("created_at", 0)),
        "updated_at": float(fields.get("updated_at", 0)),
        "stages": stages,
        "error": fields.get("error"),
        "result": _json_or_raw(fields["result"]) if "result" in fields else None,
        "failures": _json_or_raw(fields.get("failures", "[]")),
        "preemptions": int(fields.get("preemptions") or 0),
        "recovery": fields.get("recovery"),
        "spec": spec,
    }


def clear_inflight(conn: Any, job_id: str, stage: Hop, attempt: int) -> None:
    conn.zrem(keys.inflight_key(), keys.inflight_member(job_id, stage, attempt))


def stage_attempt(conn: redis.Redis, job_id: str, stage: Hop) -> int:
    value = conn.hget(keys.job_key(job_id), stage_field(stage, _ATTEMPT))
    return int(value) if value is not None else 0  # type: ignore[arg-type]


def job_fields(conn: redis.Redis, job_id: str) -> dict[str, str]:
    """The job hash, decoded; ``conn`` may be a pipeline in WATCH mode (reads run immediately there)."""
    raw: dict[bytes, bytes] = conn.hgetall(keys.job_key(job_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def mark_cancelled(conn: Any, job_id: str, stage: Hop, reason: str) -> None:
    _mark_ended(conn, job_id, stage, JobState.CANCELLED, reason)


def cancel_requested(conn: redis.Redis, job_id: str) -> bool:
    """Set by ``reelfarm cancel`` on a running job; stages check it at step boundaries."""
    return conn.hget(keys.job_key(job_id), "cancel_requested") is not None


def waiting_note(conn: redis.Redis, fields: dict[str, str], spec: Any) -> str | None:
    """Why a queued stage is not moving, when the reason is that no live worker can take it."""
    from scheduler.core.worker_registry import live_workers

    try:
        stage = Hop(fields.get("stage", ""))
    except ValueError:
        return None
    if (
        fields.get("state") not in (JobState.QUEUED, JobState.RUNNING)
        or fields.get(stage_field(stage, _STATE)) != StageState.QUEUED
    ):
        return None
    model = spec.get("model", keys.DEFAULT_MODEL) if isinstance(spec, dict) else keys.DEFAULT_MODEL
    for worker in live_workers(conn):
        if worker.get("stage") == stage.kind and model in worker.get("models", keys.DEFAULT_MODEL).split(","):
            return None
    return f"waiting: no live {stage.kind} worker serves model {model!r}; start one with `reelfarm worker {stage.kind} --models {model}`"


def route_or_default(fields: Mapping[str, Any]) -> Route:
    """The record's route; an unreadable one (planted by hand) reads as the three hops, so status and retry
    still work -- a stage that runs the job checks the route again and fails it with the reason."""
    try:
        return route_of(fields)
    except ValueError:
        return THREE_HOPS
