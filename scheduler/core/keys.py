"""Every Redis key and rq queue name reelfarm uses, built in one place.

Nothing else in the project formats a key: rq's own ``rq:job::<id>`` double-colon
bug came from keys being assembled by hand in many places. Ids are validated
before they reach a key so a user-chosen string can never address another
record.
"""

from __future__ import annotations

import re
from enum import ReprEnum

PREFIX = "reelfarm"

# Job ids double as room ids and rq job id stems; rq only accepts [A-Za-z0-9_-].
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,96}$")


_STAGE_NAMES = frozenset({"encode", "transform", "decode"})
# The parts a hop may name, per stage kind: a split denoising loop's early (high-noise) and late
# (low-noise) steps -- Wan2.2-A14B's two experts, or one Wan2.1 DiT split at a step (transform.split_at_step).
HOP_PARTS: dict[str, tuple[str, ...]] = {"transform": ("high", "low")}
# Every hop the farm can route a job through, in pipeline order (reads of "every hop's field" use it).
ALL_HOPS: tuple[str, ...] = ("encode", "transform", "transform@high", "transform@low", "decode")


class Hop(str):
    """One entry of a job's route: a stage kind, optionally with a part -- ``transform`` or ``transform@high``.

    A string, so it is a record-field prefix (``transform@high.attempt``), a JSON value and a dict key as
    it is; a `Stage` is the hop of its kind with no part (``Hop("transform") == Stage.TRANSFORM``).
    What comes before or after a hop is the job's route's to say (``scheduler.core.route``), never the hop's.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Hop:
        kind, sep, part = str(value).partition("@")
        if kind not in _STAGE_NAMES or (sep and part not in HOP_PARTS.get(kind, ())):
            raise ValueError(f"unknown hop {str(value)[:64]!r}: use one of {', '.join(ALL_HOPS)}")
        return super().__new__(cls, value)

    @property
    def kind(self) -> Stage:
        """Which stage's workers run this hop (and which model component they load)."""
        return Stage(str.partition(self, "@")[0])

    @property
    def part(self) -> str | None:
        """The share of its stage this hop does (``high``/``low``: the denoising steps before/after a split)."""
        return str.partition(self, "@")[2] or None

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def slug(self) -> str:
        """The hop in rq job ids and queue names (``transform_high``): rq ids allow only [A-Za-z0-9_-], and
        ``@`` in a queue name already separates the model."""
        return self.value.replace("@", "_")


class Stage(Hop, ReprEnum):
    """The three stage kinds, in pipeline order; each is also the hop of its kind that has no part."""

    ENCODE = "encode"
    TRANSFORM = "transform"
    DECODE = "decode"


def all_hops() -> tuple[Hop, ...]:
    return tuple(Hop(name) for name in ALL_HOPS)


def hops_of_kind(kind: Stage) -> tuple[Hop, ...]:
    """The hops ``kind``'s workers may run (``transform``, ``transform@high``, ``transform@low``)."""
    return tuple(hop for hop in all_hops() if hop.kind is kind)


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


def room_key(job_id: str, producer_stage: Hop, attempt: int) -> str:
    """Hash: the room one attempt of a hop's output waits in for the next hop."""
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


def queue_name(stage: Hop, priority: str = "default", model: str = DEFAULT_MODEL) -> str:
    """rq queue of a hop, for one model, at one priority (rq adds its own ``rq:queue:`` key prefix).

    Routing by model is routing by queue: a worker listens only on the queues of
    the models it loaded, so a job never reaches a worker that cannot run it.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    name = f"{PREFIX}-{stage.slug}"
    if model != DEFAULT_MODEL:
        name += f"@{check_id(model, 'model name')}"
    return name if priority == "default" else f"{name}-{priority}"


def hop_of_queue(name: str) -> Hop | None:
    """The hop whose queue ``name`` is (any model, any priority), or None for a queue that is not the farm's."""
    for hop in sorted(all_hops(), key=len, reverse=True):  # transform_high before its prefix transform
        base = f"{PREFIX}-{hop.slug}"
        if name == base or name.startswith((f"{base}@", f"{base}-")):
            return hop
    return None


def stage_of_queue(name: str) -> Stage | None:
    """The stage kind whose workers serve queue ``name``, or None for a queue that is not the farm's."""
    hop = hop_of_queue(name)
    return None if hop is None else hop.kind


def demand_key(stage: Hop) -> str:
    """List whose *length* is the stage's demand (queued + parked retries + in flight + held outputs).

    A list, not a counter: KEDA's redis scaler measures a key with LLEN (see ``scheduler.core.demand``).
    """
    return f"{PREFIX}:demand:{stage.value}"


def stage_job_id(job_id: str, stage: Hop, attempt: int) -> str:
    """rq job id of one attempt of one hop: unique, so a re-enqueue never collides."""
    return f"{check_id(job_id, 'job id')}-{stage.slug}-a{attempt}"


def job_id_of_stage_job(rq_job_id: str, stage: Hop) -> str | None:
    """The farm job id inside an rq job id ``stage_job_id`` made for ``stage``; None for any other id."""
    job_id, sep, attempt = rq_job_id.rpartition(f"-{stage.slug}-a")
    if not sep or not attempt.isdigit() or not job_id:
        return None
    return job_id


def inflight_key() -> str:
    """Sorted set of running stage executions (``job|stage|attempt``) scored by start time, for the reaper."""
    return f"{PREFIX}:inflight"


def inflight_member(job_id: str, stage: Hop, attempt: int) -> str:
    return f"{check_id(job_id, 'job id')}|{stage.value}|{int(attempt)}"


def parse_inflight_member(member: str) -> tuple[str, Hop, int]:
    job_id, stage, attempt = member.split("|")
    return check_id(job_id, "job id"), Hop(stage), int(attempt)


def reaper_lock_key() -> str:
    """The farm-wide maintenance lease: the id of the one process that runs maintenance passes (``reaper``)."""
    return f"{PREFIX}:lock:reaper"


def dit_recomputed_key() -> str:
    """Float counter: seconds of finished DiT work that recovery threw away and recomputed, since the farm began."""
    return f"{PREFIX}:metrics:dit_recomputed_seconds"


def server_run_key() -> str:
    """The ``run_id`` of the Redis server the farm last saw: another one answering means a failover (``reconcile``)."""
    return f"{PREFIX}:server:run_id"


def durability_fence_key() -> str:
    """Counter written just before a ``WAIT`` so the wait covers every earlier write (``durability.confirm``)."""
    return f"{PREFIX}:durability:fence"


def durability_timeouts_key() -> str:
    """Hash: replication waits that timed out, by kind of write (submit, hand-off, finish)."""
    return f"{PREFIX}:durability:timeouts"


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


def api_owner_index_key(owner: str, kind: str) -> str:
    """Sorted set of the ids of the ``videos``, ``files`` or ``batches`` one API key (by name) created,
    scored by creation time: a user key's list reads it, not the farm-wide index."""
    if kind not in ("videos", "files", "batches"):
        raise ValueError(f"invalid owner index kind {kind!r}: use videos, files or batches")
    return f"{PREFIX}:api:owner:{check_id(owner, 'API key name')}:{kind}"


def api_owner_active_key(owner: str) -> str:
    """Sorted set of an API key's jobs that may still be queued or running (pruned when counted)."""
    return f"{PREFIX}:api:owner:{check_id(owner, 'API key name')}:active"


def api_owner_held_key(owner: str) -> str:
    """Sorted set of ``<batch id>|<line>`` an API key's batches hold back from the queues (its admission
    window is full), scored in submission order."""
    return f"{PREFIX}:api:owner:{check_id(owner, 'API key name')}:held"


def api_owner_rate_key(owner: str, minute: int) -> str:
    """Counter of an API key's create requests in one minute (epoch minute), for its per-minute quota."""
    return f"{PREFIX}:api:owner:{check_id(owner, 'API key name')}:rate:{int(minute)}"


def api_batch_held_key(batch_id: str) -> str:
    """Hash: input line -> JSON ``{job_id, spec}`` of a batch's lines not yet admitted to the queues."""
    return f"{PREFIX}:api:batch:{check_id(batch_id, 'batch id')}:held"


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
