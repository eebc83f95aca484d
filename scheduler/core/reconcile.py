"""After a failover: stage calls the job records say are queued, but that no queue holds, go back on their queue.

Writes nobody waited for (``scheduler.core.durability``) can be lost when Redis fails over, or restarts
without persistence: the typical one is a dequeue. rq pops a stage call off its queues (``BLPOP`` over a
stage's priorities; no intermediate list for the reaper's ``queues.requeue_stranded`` to find it in), and
if its worker loses the connection before it records the start, the record still says "queued" and no
queue holds the call. Nothing would ever run it. So each maintenance pass (``reaper.reap_once``):

1. reads the server's ``run_id`` (``INFO server``) and compares it with the one the farm last saw
   (``keys.server_run_key``, itself replicated); equal: nothing to do (one command a pass);
2. different (another server answers: a failover, or a restart): one sweep of the unfinished jobs
   (``keys.jobs_index_key``, records read in chunks): a job whose current stage attempt is queued
   (``<stage>.state`` queued), that is not parked for a backoff and whose rq job is in neither its
   queue nor rq's intermediate list, is queued again -- the same attempt, so a copy that was in fact
   about to start is harmless (``jobs.mark_stage_started`` lets one copy run);
3. remembers the new ``run_id``.
"""

from __future__ import annotations

import logging

import redis

from scheduler.core import keys, queues
from scheduler.core.job_record import (
    JobState,
    StageField,
    StageState,
    attempt_of,
    read_records,
    routing_of,
    stage_field,
    stage_state_of,
)
from scheduler.core.jobs import route_or_default
from scheduler.core.keys import Hop
from scheduler.core.route import ROUTE_FIELD
from scheduler.core.stage_calls import StageCall

log = logging.getLogger("reelfarm.reconcile")

_FIELDS = (
    "state",
    "stage",
    "spec",
    ROUTE_FIELD,
    *(stage_field(s, f) for s in keys.all_hops() for f in (StageField.STATE, StageField.ATTEMPT)),
)


def server_changed(conn: redis.Redis) -> str | None:
    """The new server's run_id when another server answers than the farm last saw; None when it is the same."""
    try:
        run_id = str(conn.info("server").get("run_id", ""))
    except redis.ResponseError:
        return None  # INFO disabled (some managed Redis): no way to tell, so no sweep

    seen = conn.get(keys.server_run_key())
    if seen is not None and seen.decode() == run_id:  # type: ignore[union-attr]
        return None
    return run_id


def requeue_lost_calls(conn: redis.Redis, *, secret: bytes) -> list[str]:
    """Queue again every queued stage attempt no queue holds (see the module docstring); returns their job ids."""
    run_id = server_changed(conn)
    if run_id is None:
        return []
    ids = [raw.decode() for raw in conn.zrange(keys.jobs_index_key(), 0, -1)]  # type: ignore[union-attr]
    waiting = []
    for job_id, fields in read_records(conn, ids, _FIELDS):
        if not fields or fields.get("state") not in (JobState.QUEUED.value, JobState.RUNNING.value):
            continue
        try:
            stage = Hop(fields.get("stage") or "")
        except ValueError:
            continue
        if stage_state_of(fields, stage) == StageState.QUEUED.value:
            waiting.append((job_id, stage, fields))
    requeued = [job_id for job_id, stage, fields in waiting if _requeue_if_lost(conn, job_id, stage, fields, secret)]
    conn.set(keys.server_run_key(), run_id)
    for job_id in requeued:
        log.warning("job %s: its queued stage call was lost (Redis failed over or restarted); queued again", job_id)
    return requeued


def _requeue_if_lost(
    conn: redis.Redis, job_id: str, stage: Hop, fields: dict[str, str | None], secret: bytes
) -> bool:
    attempt = attempt_of(fields, stage)
    routing = routing_of(fields.get("spec"))
    queue = queues.stage_queue(conn, stage, routing.priority, routing.model)
    rq_job_id = keys.stage_job_id(job_id, stage, attempt)
    probe = conn.pipeline(transaction=False)
    probe.lpos(queue.key, rq_job_id)
    probe.lpos(queue.intermediate_queue_key, rq_job_id)
    probe.hexists(keys.delayed_calls_key(), job_id)
    in_queue, dequeued, parked = probe.execute()
    if in_queue is not None or dequeued is not None or parked:
        return False
    route = route_or_default(fields)
    upstream = route.previous(stage) if stage in route else None
    call = StageCall(job_id, stage, attempt, attempt_of(fields, upstream) if upstream is not None else None)
    queues.enqueue_stages(conn, [(call, routing)], secret=secret)
    return True
