"""The farm's rq queues: the only module that imports rq.

Each stage has a plain rq queue (so ``rq info`` and rq-dashboard show them) and
every job payload goes through rq's JSON serializer -- never pickle, because a
pickle from Redis is code execution for whoever can write to Redis. The payload
is only ids and counters: tensors travel through rooms, never through here.
Every call enqueued here is signed (``scheduler.core.stage_calls``); workers read a
dequeued rq job through ``call_fields`` -- which imports nothing it names --
and refuse what the farm did not sign.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import redis
from rq import Queue, SimpleWorker, worker_registration
from rq.job import Job
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ReadyJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer
from rq.suspension import WORKERS_SUSPENDED
from rq.timeouts import TimerDeathPenalty
from rq.utils import current_timestamp, now
from rq.worker import WorkerStatus

from scheduler.core import demand, keys
from scheduler.core.job_record import Routing
from scheduler.core.keys import Hop, Stage
from scheduler.core.stage_calls import SIGNATURE_META_KEY, STAGE_ENTRYPOINT, CallFields, StageCall, sign_call

RESULT_TTL_SECONDS = 24 * 3600
FAILURE_TTL_SECONDS = 7 * 24 * 3600

__all__ = [
    "STAGE_ENTRYPOINT",
    "FarmWorker",
    "SimpleWorker",
    "TimerDeathPenalty",
    "WorkerStatus",
    "JSONSerializer",
    "stage_queue",
    "enqueue_stage",
    "call_fields",
]


def transaction(conn: redis.Redis) -> Any:
    """A MULTI pipeline that rq's enqueue can join (rq requires explicit MULTI mode before the first command)."""
    pipe = conn.pipeline(transaction=True)
    pipe.multi()
    return pipe


def stage_queue(conn: redis.Redis, stage: Hop, priority: str = "default", model: str = keys.DEFAULT_MODEL) -> Queue:
    return Queue(keys.queue_name(stage, priority, model), connection=conn, serializer=JSONSerializer)


def stage_queues_by_priority(
    conn: redis.Redis, stage: Hop, models: list[str] | tuple[str, ...] = (keys.DEFAULT_MODEL,)
) -> list[Queue]:
    """A hop's queues for the given models, highest priority first: rq workers drain them in this order."""
    return [stage_queue(conn, stage, priority, model) for priority in keys.PRIORITIES for model in models]


def worker_queues(
    conn: redis.Redis,
    kind: Stage,
    models: list[str] | tuple[str, ...] = (keys.DEFAULT_MODEL,),
    expert: str | None = None,
) -> list[Queue]:
    """Every queue a ``kind`` worker serving ``models`` listens on: each hop of its kind (a transform worker
    takes ``transform`` and both parts of a split loop), highest priority first, then in route order. A
    transform worker holding one Wan2.2 ``expert`` takes only that expert's hop (``transform@high``)."""
    hops = keys.hops_of_kind(kind) if expert is None else (keys.Hop(f"{kind.value}@{expert}"),)
    return [stage_queue(conn, hop, priority, model) for priority in keys.PRIORITIES for hop in hops for model in models]


class FarmWorker(SimpleWorker):  # type: ignore[misc]
    """rq's non-forking worker with its per-job bookkeeping trimmed to what rq needs: the base of every
    farm stage worker (``workers.stage_worker.StageWorker``, ``bench.zero_stage``'s zero-compute one).

    rq refreshes its worker key up to five times per stage job (after the job, in the suspension check,
    before and after the dequeue, at the job's start), each an HSET and two EXPIREs: 45 of the ~300
    commands of a three-stage job. They only keep rq's own worker key and executions set from expiring (the farm's
    liveness is its own worker record, ``workers.runtime``'s heartbeat thread), so here a refresh is sent
    only when the expiry the last one set would fall more than ``rq_heartbeat_slack_seconds`` short of
    what rq asks for now: a busy worker refreshes about once per slack, an idle one (a dequeue timeout of
    ``worker_ttl - 15`` s between refreshes) exactly as rq does, and the key never expires earlier than
    rq wanted by more than the slack.
    """

    rq_heartbeat_slack_seconds = 5.0
    _rq_key_expires_at: float | None = None

    def heartbeat(self, timeout: int | None = None, pipeline: Any | None = None) -> None:
        wanted = timeout or self.worker_ttl + 60
        at = time.monotonic()
        expires_at, slack = self._rq_key_expires_at, min(self.rq_heartbeat_slack_seconds, wanted / 4)
        if expires_at is not None and expires_at >= at + wanted - slack:
            return
        super().heartbeat(timeout, pipeline)
        self._rq_key_expires_at = at + wanted

    def set_state(self, state: str, pipeline: Any | None = None) -> None:
        # rq marks the worker idle twice between two jobs (after one, then before the dequeue): the
        # second write changes nothing. A write into a caller's pipeline is always kept.
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        # rq asks before every dequeue in a MULTI of its own around a heartbeat (skipped here while
        # fresh) and one EXISTS: three commands for one. Only a suspended farm (`rq suspend`) goes
        # through rq's own wait, which heartbeats and marks the worker suspended as before.
        self.heartbeat()
        if self.connection.exists(WORKERS_SUSPENDED):
            super().check_for_suspension(burst)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # rq writes the job hash's last_heartbeat here, in a round trip of its own, just before the success
        # handler saves the whole hash (last_heartbeat included). Only a stage call that raises to rq takes
        # rq's failure path, which does not save it -- and the farm's stage function never raises (its
        # outcomes are in the job record); rq's failure record carries its own time anyway.
        job.ended_at = now()
        job.last_heartbeat = job.ended_at


def _stage_job_data(secret: bytes, call: StageCall) -> Any:
    rq_job_id = keys.stage_job_id(call.job_id, call.stage, call.attempt)
    return Queue.prepare_data(
        STAGE_ENTRYPOINT,
        kwargs=call.kwargs(),
        job_id=rq_job_id,
        meta={SIGNATURE_META_KEY: sign_call(secret, rq_job_id, call)},
        # The farm enforces its own stage deadlines; rq's signal-based timeout would cut a DiT run.
        timeout=-1,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"{call.stage.value} {call.job_id} attempt {call.attempt}",
    )


def enqueue_stage(
    conn: redis.Redis,
    job_id: str,
    stage: Hop,
    attempt: int,
    upstream_attempt: int | None,
    priority: str = "default",
    pipeline: Any | None = None,
    model: str = keys.DEFAULT_MODEL,
    *,
    secret: bytes,
) -> str:
    """Put one attempt of one stage of a job on its queue, signed with ``secret``; joins the caller's pipeline.

    Only the rq side: the farm's own code goes through ``job_retry.queue_stage``, which records it in the job too.
    """
    call = StageCall(job_id, stage, attempt, upstream_attempt)
    enqueue_stages(conn, [(call, Routing(priority, model))], pipeline=pipeline, secret=secret)
    return keys.stage_job_id(job_id, stage, attempt)


def enqueue_stages(
    conn: redis.Redis, calls: Sequence[tuple[StageCall, Routing]], pipeline: Any | None = None, *, secret: bytes
) -> None:
    """Enqueue many stage calls at once, each signed with ``secret``: one rq ``enqueue_many`` per queue,
    which is what makes a 10,000-line batch take seconds."""
    by_queue: dict[tuple[Hop, str, str], list[Any]] = {}
    for call, routing in calls:
        by_queue.setdefault((call.stage, routing.priority, routing.model), []).append(_stage_job_data(secret, call))
    for (stage, priority, model), datas in by_queue.items():
        stage_queue(conn, stage, priority, model).enqueue_many(datas, pipeline=pipeline)
        # In the same pipeline as the jobs: an autoscaler sees the demand when the work exists.
        demand.add_demand(pipeline if pipeline is not None else conn, stage, len(datas))


def call_fields(job: Job) -> CallFields:
    """What a dequeued rq job asks for, read without importing or calling anything it names.

    Raises ``ValueError`` when the job's data cannot be deserialised (rq's ``DeserializationError``).
    """
    try:
        func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except Exception as exc:  # noqa: BLE001 - rq wraps any serializer failure; all mean "unreadable"
        raise ValueError(f"the rq job's data cannot be read ({type(exc).__name__})") from None
    dependency_ids = job._dependency_ids or []
    if not isinstance(dependency_ids, list) or not all(isinstance(d, str) for d in dependency_ids):
        raise ValueError("the rq job's dependency ids are not a list of ids")
    callbacks = tuple(
        name
        for name in (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name)
        if name is not None
    )
    return CallFields(
        rq_job_id=job.id,
        func_name=func_name if isinstance(func_name, str) else repr(func_name),
        instance=instance,
        args=args,
        kwargs=kwargs,
        callbacks=callbacks,
        webhooks=len(job.webhooks or ()),
        # Dependents would be enqueued by rq when this job ends; the farm never attaches any.
        dependency_ids=tuple(dependency_ids)
        + tuple(f"dependent {d!r}" for d in job.connection.smembers(job.dependents_key)),  # type: ignore[union-attr]
        meta=job.meta,
    )


def clean_registries_without_hooks(queue: Queue) -> None:
    """rq's registry maintenance for ``queue``, minus the parts that run code a job names.

    rq's own ``clean_registries`` fails expired entries of the started registry and
    of the dequeued list through its failure path, which imports the job's failure
    callback and sends its webhooks -- for jobs no worker ever vetted. The farm's
    reaper owns recovery of stage calls (``requeue_stranded``, ``recovery``), so
    here expired started entries are only dropped; the other registries are pure
    bookkeeping and are cleaned as rq does.
    """
    options: dict[str, Any] = {"name": queue.name, "connection": queue.connection, "serializer": queue.serializer}
    for registry_class in (FinishedJobRegistry, FailedJobRegistry, DeferredJobRegistry, ReadyJobRegistry):
        registry_class(**options).cleanup()
    started = StartedJobRegistry(**options)
    queue.connection.zremrangebyscore(started.key, 0, current_timestamp())
    worker_registration.clean_worker_registry(queue)


# Move one rq job id from one list to another, only if it is still in the first (one step, so two workers
# or a worker and the reaper never both move it). KEYS: from, to. ARGV: id, "LPUSH" (to the head) or
# "RPUSH" (to the tail). Claiming a batch-mate moves it from its queue into the intermediate list, as rq's
# BLMOVE dequeue does; the reaper puts a stranded dequeue back at the head of its queue -- unless a
# worker started it meanwhile: the start takes the id out of the intermediate list, so it is not found.
_MOVE_ID = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  if ARGV[2] == 'LPUSH' then redis.call('LPUSH', KEYS[2], ARGV[1]) else redis.call('RPUSH', KEYS[2], ARGV[1]) end
  return 1
end
return 0
"""


def _move_id(conn: redis.Redis, rq_job_id: str, source: str, target: str, push: Literal["LPUSH", "RPUSH"]) -> bool:
    return bool(conn.eval(_MOVE_ID, 2, source, target, rq_job_id, push))


def queued_ids(conn: redis.Redis, queue: Queue, limit: int) -> list[str]:
    """The first ``limit`` rq job ids waiting on ``queue``, head first."""
    raw: list[bytes] = conn.lrange(queue.key, 0, limit - 1)  # type: ignore[assignment]
    return [item.decode() for item in raw]


def claim_queued(conn: redis.Redis, queue: Queue, rq_job_id: str) -> bool:
    """Take ``rq_job_id`` off ``queue`` for this worker (True), unless another worker took it first (False).

    The job waits in ``queue``'s intermediate list until ``mark_claimed_started`` (a crash before that
    leaves it to the reaper's ``requeue_stranded``).
    """
    # Into the intermediate list as rq's BLMOVE dequeue does: a crash before the start leaves it for the reaper.
    return _move_id(conn, rq_job_id, queue.key, queue.intermediate_queue_key, "RPUSH")


def mark_claimed_started(conn: redis.Redis, queue: Queue, rq_job_id: str) -> None:
    """A claimed job is starting: out of the intermediate list (rq's start does this only for a worker of one
    queue; the farm's workers listen on several). From here the farm's in-flight record covers it."""
    conn.lrem(queue.intermediate_queue_key, 1, rq_job_id)


def fetch_stage_job(conn: redis.Redis, rq_job_id: str) -> Job:
    """A claimed rq job, read with the farm's JSON serializer (raises when its hash cannot be read)."""
    return Job.fetch(rq_job_id, connection=conn, serializer=JSONSerializer)


def remove_refused(pipe: Any, queue: Queue, rq_job_id: str) -> None:
    """Take a refused rq job out of rq entirely (joins the caller's pipeline): off the dequeued list, hash gone,
    so no rq command -- requeue, a dashboard's retry -- can bring it back to a worker."""
    pipe.lrem(queue.intermediate_queue_key, 0, rq_job_id)
    pipe.lrem(queue.key, 0, rq_job_id)
    pipe.delete(Job.key_for(rq_job_id), Job.dependents_key_for(rq_job_id))


def requeue_stranded(conn: redis.Redis, min_age_seconds: float, now: float | None = None) -> list[str]:
    """Put back stage jobs that were dequeued but never started; returns their rq job ids.

    rq's dequeue is a BLMOVE from the queue into an intermediate list; the worker then
    records the start, which takes the id out again. If the connection dies in between
    (a Redis restart, a network cut) the id stays in the intermediate list and nobody
    runs it: rq's own cleanup only *fails* such a job, ten minutes later. An id seen
    there on two reaper passes at least ``min_age_seconds`` apart is stranded (a live
    worker starts a dequeued job within milliseconds) and goes back to the front of its
    queue. If it was started after all, ``jobs.mark_stage_started`` lets one copy run.
    """
    now = time.time() if now is None else now
    requeued: list[str] = []
    for queue in Queue.all(connection=conn, serializer=JSONSerializer):
        if not queue.name.startswith(keys.PREFIX):
            continue
        stranded: list[bytes] = conn.lrange(queue.intermediate_queue_key, 0, -1)  # type: ignore[assignment]
        for raw in stranded:
            rq_job_id = raw.decode()
            seen_key = keys.stranded_seen_key(queue.name, rq_job_id)
            if conn.set(seen_key, repr(now), nx=True, ex=max(600, int(10 * min_age_seconds))):
                continue
            first_seen = float(conn.get(seen_key) or now)  # type: ignore[arg-type]
            if now - first_seen < min_age_seconds:
                continue
            if _move_id(conn, rq_job_id, queue.intermediate_queue_key, queue.key, "LPUSH"):
                requeued.append(rq_job_id)
            conn.delete(seen_key)
    return requeued


def stage_backlog(conn: redis.Redis) -> dict[Hop, int]:
    """Stage jobs waiting per hop, over every farm queue rq knows (all models, all priorities), counting
    the ones rq dequeued but no worker started yet (its intermediate lists)."""
    backlog = dict.fromkeys(keys.all_hops(), 0)
    farm_queues = [
        (stage, queue)
        for queue in Queue.all(connection=conn, serializer=JSONSerializer)
        if (stage := keys.hop_of_queue(queue.name)) is not None
    ]
    pipe = conn.pipeline(transaction=False)
    for _, queue in farm_queues:
        pipe.llen(queue.key)
        pipe.llen(queue.intermediate_queue_key)
    lengths = pipe.execute()
    for i, (stage, _) in enumerate(farm_queues):
        backlog[stage] += int(lengths[2 * i]) + int(lengths[2 * i + 1])
    return backlog


def queue_depths(conn: redis.Redis, models: list[str] | tuple[str, ...] = (keys.DEFAULT_MODEL,)) -> dict[str, int]:
    """Queued stage jobs per hop: every stage kind, and a part hop (``transform@high``) where it has any."""
    depths = {hop.value: sum(q.count for q in stage_queues_by_priority(conn, hop, models)) for hop in keys.all_hops()}
    return {hop: n for hop, n in depths.items() if n or Hop(hop).part is None}
