"""The farm's rq queues: the only module that imports rq.

Each stage has a plain rq queue (so ``rq info`` and rq-dashboard show them) and
every job payload goes through rq's JSON serializer -- never pickle, because a
pickle from Redis is code execution for whoever can write to Redis. The payload
is only ids and counters: tensors travel through rooms, never through here.
"""

from __future__ import annotations

from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from scheduler import keys
from scheduler.keys import Stage

# The function each stage worker runs, referenced by name so the control plane never imports it.
STAGE_ENTRYPOINT = "workers.stage_job.run_stage"
RESULT_TTL_SECONDS = 24 * 3600
FAILURE_TTL_SECONDS = 7 * 24 * 3600

__all__ = ["STAGE_ENTRYPOINT", "SimpleWorker", "JSONSerializer", "stage_queue", "enqueue_stage"]


def transaction(conn: redis.Redis) -> Any:
    """A MULTI pipeline that rq's enqueue can join (rq requires explicit MULTI mode before the first command)."""
    pipe = conn.pipeline(transaction=True)
    pipe.multi()
    return pipe


def stage_queue(conn: redis.Redis, stage: Stage, priority: str = "default", model: str = keys.DEFAULT_MODEL) -> Queue:
    return Queue(keys.queue_name(stage, priority, model), connection=conn, serializer=JSONSerializer)


def stage_queues_by_priority(
    conn: redis.Redis, stage: Stage, models: list[str] | tuple[str, ...] = (keys.DEFAULT_MODEL,)
) -> list[Queue]:
    """A stage's queues for the given models, highest priority first: rq workers drain them in this order."""
    return [stage_queue(conn, stage, priority, model) for priority in keys.PRIORITIES for model in models]


def _stage_job_data(job_id: str, stage: Stage, attempt: int, upstream_attempt: int | None) -> Any:
    return Queue.prepare_data(
        STAGE_ENTRYPOINT,
        kwargs={"job_id": job_id, "stage": stage.value, "attempt": attempt, "upstream_attempt": upstream_attempt},
        job_id=keys.stage_job_id(job_id, stage, attempt),
        # The farm enforces its own stage deadlines; rq's signal-based timeout would cut a DiT run.
        timeout=-1,
        result_ttl=RESULT_TTL_SECONDS,
        failure_ttl=FAILURE_TTL_SECONDS,
        description=f"{stage.value} {job_id} attempt {attempt}",
    )


def enqueue_stage(
    conn: redis.Redis,
    job_id: str,
    stage: Stage,
    attempt: int,
    upstream_attempt: int | None,
    priority: str = "default",
    pipeline: Any | None = None,
    model: str = keys.DEFAULT_MODEL,
) -> str:
    """Put one attempt of one stage of a job on its queue; joins the caller's pipeline."""
    enqueue_stages(conn, stage, [(job_id, attempt, upstream_attempt, priority, model)], pipeline=pipeline)
    return keys.stage_job_id(job_id, stage, attempt)


def enqueue_stages(
    conn: redis.Redis,
    stage: Stage,
    items: list[tuple[str, int, int | None, str, str]],
    pipeline: Any | None = None,
) -> None:
    """Enqueue many ``(job_id, attempt, upstream_attempt, priority, model)`` at once: one rq
    ``enqueue_many`` per queue, which is what makes a 10,000-line batch take seconds."""
    by_queue: dict[tuple[str, str], list[Any]] = {}
    for job_id, attempt, upstream_attempt, priority, model in items:
        data = _stage_job_data(job_id, stage, attempt, upstream_attempt)
        by_queue.setdefault((priority, model), []).append(data)
    for (priority, model), datas in by_queue.items():
        stage_queue(conn, stage, priority, model).enqueue_many(datas, pipeline=pipeline)


def queue_depths(conn: redis.Redis, models: list[str] | tuple[str, ...] = (keys.DEFAULT_MODEL,)) -> dict[str, int]:
    return {stage.value: sum(q.count for q in stage_queues_by_priority(conn, stage, models)) for stage in Stage}
