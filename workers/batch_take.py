"""Which queued jobs a transform worker takes beside the one rq gave it, to denoise them as a batch.

rq hands a worker one job. With ``transform.batch_size`` above 1, the worker then looks at the
heads of its queues (highest priority first) for jobs it can denoise together with that one, and
takes each by id the way rq's dequeue takes the head (``queues.claim_queued``: another worker that
took it first wins, a crash before the start leaves it for the reaper). Compatible means equal
DiT input shapes -- model, height, width, frames, guidance on or off --, the same LoRAs at the
same scales (they are the DiT's weights for the call), and no step cache (a cache decides per DiT
call, so a cached job runs alone). Seeds, prompts, guidance scales and
step counts may differ: each job keeps its own scheduler (`workers.stages.step_batcher`).

Backpressure counts the batch: every job of a batch hands off its own output, so the worker takes
no more jobs than it has free slots, and waits at most ``transform.batch_wait_ms`` for more to arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from scheduler.core import keys, queues
from scheduler.core.keys import Stage
from scheduler.core.spec import JobSpec
from workers.runtime import StageRuntime
from workers.stages.payloads import uses_cfg

# How far down each queue to look for batch-mates: jobs further back wait their turn.
LOOK_AHEAD_PER_SLOT = 8
POLL_SECONDS = 0.001

BatchKey = tuple[object, ...]
# Takes a claimed rq job id from a queue: its rq job if it is a call this worker may run, else None (refused).
TakeClaimed = Callable[[Any, str], Any | None]


def batch_key(spec: JobSpec) -> BatchKey | None:
    """What must be equal for two jobs to share DiT calls; None for a job that runs alone."""
    if spec.cache is not None:
        return None
    # The LoRAs are the DiT's weights for the call: batch-mates must share the very same set and scales.
    loras = tuple((choice.name, choice.scale) for choice in spec.loras)
    return (
        spec.model,
        spec.image is not None,
        spec.height,
        spec.width,
        spec.frames,
        uses_cfg(spec.guidance_scale),
        loras,
    )


def _batch_keys(conn: redis.Redis, job_ids: Sequence[str]) -> list[BatchKey | None]:
    pipe = conn.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(keys.job_key(job_id), "spec")
    found: list[BatchKey | None] = []
    for raw in pipe.execute():
        try:
            found.append(batch_key(JobSpec.model_validate_json(raw)) if raw is not None else None)
        except ValueError:
            found.append(None)  # an unreadable spec fails in its own run, never in a batch
    return found


def take_batch_mates(
    rt: StageRuntime, worker_queues: Sequence[Any], leader_job_id: str, take: TakeClaimed
) -> list[Any]:
    """rq jobs (with their queues) taken to run beside ``leader_job_id``'s transform: up to ``batch_size - 1``."""
    settings = rt.settings.transform
    room = min(settings.batch_size - 1, rt.pool.free_count - 1)
    if rt.stage is not Stage.TRANSFORM or room <= 0:
        return []
    leader_key = _batch_keys(rt.conn, [leader_job_id])[0]
    if leader_key is None:
        return []
    mates: list[Any] = []
    passed_over: set[str] = set()
    deadline = time.monotonic() + settings.batch_wait_ms / 1000
    while True:
        for queue in worker_queues:
            waiting = [
                rq_id
                for rq_id in queues.queued_ids(rt.conn, queue, LOOK_AHEAD_PER_SLOT * settings.batch_size)
                if rq_id not in passed_over
            ]
            # Mates are taken from every transform hop's queue (each rq id names its hop, as its queue does).
            hop = keys.hop_of_queue(queue.name) or Stage.TRANSFORM
            job_ids = [keys.job_id_of_stage_job(rq_id, hop) for rq_id in waiting]
            named = [(rq_id, job_id) for rq_id, job_id in zip(waiting, job_ids, strict=True) if job_id is not None]
            for (rq_id, _), key in zip(named, _batch_keys(rt.conn, [job_id for _, job_id in named]), strict=True):
                if key != leader_key:
                    passed_over.add(rq_id)
                    continue
                if not queues.claim_queued(rt.conn, queue, rq_id):
                    continue  # another worker took it
                rq_job = take(queue, rq_id)
                if rq_job is not None:
                    mates.append((rq_job, queue))
                if len(mates) >= room:
                    return mates
            passed_over.update(rq_id for rq_id, job_id in zip(waiting, job_ids, strict=True) if job_id is None)
        if time.monotonic() >= deadline:
            return mates
        time.sleep(POLL_SECONDS)
