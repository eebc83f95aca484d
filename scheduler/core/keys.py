"""Every Redis key and rq queue name reelfarm uses, built in one place.

Nothing else in the project formats a key: rq's own ``rq:job::<id>`` double-colon
bug came from keys being assembled by hand in many places. Ids are validated
before they reach a key so a user-chosen string can never address another
record.
"""

from __future__ import annotations

import re
from enum import StrEnum

PREFIX = "reelfarm"

# Job ids double as room ids and rq job id stems; rq only accepts [A-Za-z0-9_-].
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,96}$")


class Stage(StrEnum):
    """The three stages, in pipeline order."""

    ENCODE = "encode"
    TRANSFORM = "transform"
    DECODE = "decode"

    @property
    def next(self) -> Stage | None:
        order = list(Stage)
        i = order.index(self)
        return order[i + 1] if i + 1 < len(order) else None

    @property
    def previous(self) -> Stage | None:
        order = list(Stage)
        i = order.index(self)
        return order[i - 1] if i > 0 else None


def check_id(value: str, what: str = "id") -> str:
    if not ID_PATTERN.match(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-96 characters from A-Z a-z 0-9 _ -")
    return value


def job_key(job_id: str) -> str:
    """Hash: the job record (spec, state, per-stage timings, attempts, result)."""
    return f"{PREFIX}:job:{check_id(job_id, 'job id')}"


def jobs_index_key() -> str:
    """Sorted set of job ids scored by submit time (newest last)."""
    return f"{PREFIX}:jobs"


def room_key(job_id: str, producer_stage: Stage, attempt: int) -> str:
    """Hash: the room one attempt of a stage's output waits in for the next stage."""
    return f"{PREFIX}:room:{check_id(job_id, 'job id')}:{producer_stage.value}:a{int(attempt)}"


def worker_key(worker_id: str) -> str:
    """Hash: a registered worker (stage, endpoint, model, load counter); expires without heartbeats."""
    return f"{PREFIX}:worker:{check_id(worker_id, 'worker id')}"


def workers_index_key() -> str:
    """Set of worker ids that have registered (live ones also have an unexpired worker_key)."""
    return f"{PREFIX}:workers"


def acks_key(worker_id: str) -> str:
    """List a producer blocks on: consumers push the room keys they finished pulling."""
    return f"{PREFIX}:acks:{check_id(worker_id, 'worker id')}"


PRIORITIES = ("high", "default", "low")


DEFAULT_MODEL = "default"


def queue_name(stage: Stage, priority: str = "default", model: str = DEFAULT_MODEL) -> str:
    """rq queue of a stage, for one model, at one priority (rq adds its own ``rq:queue:`` key prefix).

    Routing by model is routing by queue: a worker listens only on the queues of
    the models it loaded, so a job never reaches a worker that cannot run it.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    name = f"{PREFIX}-{stage.value}"
    if model != DEFAULT_MODEL:
        name += f"@{check_id(model, 'model name')}"
    return name if priority == "default" else f"{name}-{priority}"


def stage_of_queue(name: str) -> Stage | None:
    """The stage whose queue ``name`` is (any model, any priority), or None for a queue that is not the farm's."""
    for stage in Stage:
        base = f"{PREFIX}-{stage.value}"
        if name == base or name.startswith((f"{base}@", f"{base}-")):
            return stage
    return None


def demand_key(stage: Stage) -> str:
    """List whose *length* is the stage's demand (queued + parked retries + in flight + held outputs).

    A list, not a counter: KEDA's redis scaler measures a key with LLEN (see ``scheduler.core.demand``).
    """
    return f"{PREFIX}:demand:{stage.value}"


def stage_job_id(job_id: str, stage: Stage, attempt: int) -> str:
    """rq job id of one attempt of one stage: unique, so a re-enqueue never collides."""
    return f"{check_id(job_id, 'job id')}-{stage.value}-a{attempt}"


def job_id_of_stage_job(rq_job_id: str, stage: Stage) -> str | None:
    """The farm job id inside an rq job id ``stage_job_id`` made for ``stage``; None for any other id."""
    job_id, sep, attempt = rq_job_id.rpartition(f"-{stage.value}-a")
    if not sep or not attempt.isdigit() or not job_id:
        return None
    return job_id


def inflight_key() -> str:
    """Sorted set of running stage executions (``job|stage|attempt``) scored by start time, for the reaper."""
    return f"{PREFIX}:inflight"


def inflight_member(job_id: str, stage: Stage, attempt: int) -> str:
    return f"{check_id(job_id, 'job id')}|{stage.value}|{int(attempt)}"


def parse_inflight_member(member: str) -> tuple[str, Stage, int]:
    job_id, stage, attempt = member.split("|")
    return check_id(job_id, "job id"), Stage(stage), int(attempt)


def reaper_lock_key() -> str:
    """Lock held by whichever process runs the maintenance pass, so passes never overlap."""
    return f"{PREFIX}:lock:reaper"


def stranded_seen_key(queue: str, rq_job_id: str) -> str:
    """When the reaper first saw an rq job id sitting in ``queue``'s intermediate (dequeued, not started) list."""
    return f"{PREFIX}:stranded:{queue}:{rq_job_id}"


def delayed_calls_key() -> str:
    """Hash: job id -> the stage call (JSON) parked in ``delayed_key`` until its backoff ends."""
    return f"{PREFIX}:delayed:calls"


def refused_calls_key() -> str:
    """List of refused rq jobs (JSON records, newest first, capped): calls a stage worker would not run."""
    return f"{PREFIX}:refused"


def refused_counts_key() -> str:
    """Hash: refused rq jobs counted by reason, since the farm began."""
    return f"{PREFIX}:refused:counts"


def delayed_key() -> str:
    """Sorted set of stage enqueues waiting out a retry backoff, scored by due time."""
    return f"{PREFIX}:delayed"


# Batch names appear in job ids (``b-<name>-<16 hex>``, at most 96 characters) and in object keys.
BATCH_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_batch_name(value: str) -> str:
    if not BATCH_NAME_PATTERN.match(value):
        raise ValueError(f"invalid batch name {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    return value


def batch_key(name: str) -> str:
    """Hash: a batch record (created/updated times, source, line and submission counts)."""
    return f"{PREFIX}:batch:{check_batch_name(name)}"


def batch_jobs_key(name: str) -> str:
    """Sorted set of a batch's job ids scored by their line number in the batch file."""
    return f"{PREFIX}:batch:{check_batch_name(name)}:jobs"


def batches_index_key() -> str:
    """Sorted set of batch names scored by creation time."""
    return f"{PREFIX}:batches"


def cron_tick_key(schedule: str, tick_epoch: int) -> str:
    """String claimed with SET NX by the one cron process that enqueues this tick of this schedule."""
    return f"{PREFIX}:cron:{check_id(schedule, 'schedule name')}:tick:{int(tick_epoch)}"


def cron_history_key(schedule: str) -> str:
    """Sorted set of the batch names a schedule enqueued, scored by tick time."""
    return f"{PREFIX}:cron:{check_id(schedule, 'schedule name')}:batches"


# --------------------------------------------------------------------------- the HTTP front (scheduler.http)


def api_file_key(file_id: str) -> str:
    """Hash: an uploaded or generated file of the HTTP front (purpose, name, bytes, object key, created time)."""
    return f"{PREFIX}:api:file:{check_id(file_id, 'file id')}"


def api_files_index_key() -> str:
    """Sorted set of file ids scored by creation time."""
    return f"{PREFIX}:api:files"


def api_batch_key(batch_id: str) -> str:
    """Hash: an OpenAI-style batch (input file, endpoint, status times, result file ids); its jobs are the
    reelfarm batch of the same name."""
    return f"{PREFIX}:api:batch:{check_id(batch_id, 'batch id')}"


def api_batch_requests_key(batch_id: str) -> str:
    """Hash: input line number -> JSON ``{custom_id, job_id}`` or ``{custom_id, error}`` for one batch."""
    return f"{PREFIX}:api:batch:{check_id(batch_id, 'batch id')}:requests"


def api_batches_index_key() -> str:
    """Sorted set of OpenAI-style batch ids scored by creation time."""
    return f"{PREFIX}:api:batches"


def api_watch_key() -> str:
    """Sorted set of ``video:<job id>`` / ``batch:<batch id>`` whose end the front still has to announce."""
    return f"{PREFIX}:api:watch"


def deleting_jobs_key() -> str:
    """Sorted set of deleted jobs whose objects and record go once they have stopped (scored by delete time)."""
    return f"{PREFIX}:api:deleting"


def webhook_outbox_key() -> str:
    """Sorted set of webhook deliveries (``<event id>|<endpoint index>``) scored by when they are next due."""
    return f"{PREFIX}:webhooks:outbox"


def webhook_event_key(event_id: str) -> str:
    """String: one event's JSON body, kept while any delivery of it is pending."""
    return f"{PREFIX}:webhooks:event:{check_id(event_id, 'event id')}"


def webhook_attempts_key() -> str:
    """Hash: delivery (``<event id>|<endpoint index>``) -> attempts made so far."""
    return f"{PREFIX}:webhooks:attempts"


def lora_registry_key() -> str:
    """Hash: LoRA name -> JSON {source, sha256, bytes, expert} of the adapters ``reelfarm lora add`` registered."""
    return f"{PREFIX}:loras"
