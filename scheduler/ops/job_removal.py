"""Deleting a job: stop it, then remove its objects and its record -- in that order, and durably.

1. ``delete_job`` cancels the job (a queued one at once; a running one is asked
   to stop at its next step boundary), marks its record ``deleted``, takes it
   out of the jobs index and puts it in the deleting set, all before returning:
   from then on nobody lists or shows it.
2. ``sweep_deleted`` (called right away, then by the HTTP front's watcher)
   removes the objects (video, poster, metadata, input image) and the record of
   each deleting job that has stopped. A job still running keeps its record
   until its worker has stopped, so the worker never writes into a record that
   is gone (which would recreate a partial one), and an upload it finishes
   anyway is removed after it.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from scheduler.core import jobs, keys
from scheduler.core.job_record import is_finished, read_records
from scheduler.core.object_store import delete_objects
from scheduler.core.output_keys import output_keys
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec
from scheduler.ops.job_admin import cancel_job

DELETED_FIELD = "deleted"


def is_deleted(fields: dict[str, str | None]) -> bool:
    return fields.get(DELETED_FIELD) == "1"


def delete_job(conn: redis.Redis, settings: FarmSettings, job_id: str, client: Any) -> None:
    """Stop ``job_id`` and schedule its objects and record for removal; ``JobNotFound`` if there is no such job."""
    fields = jobs.job_fields(conn, job_id)
    if not fields or fields.get(DELETED_FIELD) == "1":
        raise jobs.JobNotFound(f"job {job_id} not found (check the id with `reelfarm ls`)")
    cancel_job(conn, job_id)
    pipe = conn.pipeline(transaction=True)
    pipe.hset(keys.job_key(job_id), mapping={DELETED_FIELD: "1", "updated_at": repr(time.time())})
    pipe.zrem(keys.jobs_index_key(), job_id)
    pipe.zadd(keys.deleting_jobs_key(), {job_id: time.time()})
    pipe.execute()
    sweep_deleted(conn, settings, client)


def sweep_deleted(conn: redis.Redis, settings: FarmSettings, client: Any) -> int:
    """Remove the objects and records of deleted jobs that have stopped; returns how many went."""
    ids = [m.decode() for m in conn.zrange(keys.deleting_jobs_key(), 0, 999)]  # type: ignore[union-attr]
    removed = 0
    for job_id, fields in read_records(conn, ids, ("state", "spec")):
        if fields is not None and not is_finished(fields):
            continue  # still stopping: its worker may write to the record yet
        spec = _spec_or_none(fields)
        if spec is not None:
            out = output_keys(settings.s3.key_prefix, spec.output_prefix, job_id)
            delete_objects(client, settings.s3.bucket, [out.video, out.poster, out.metadata, out.input_image])
        pipe = conn.pipeline(transaction=True)
        pipe.delete(keys.job_key(job_id))
        pipe.zrem(keys.deleting_jobs_key(), job_id)
        pipe.execute()
        removed += 1
    return removed


def _spec_or_none(fields: dict[str, str | None] | None) -> JobSpec | None:
    try:
        return JobSpec.model_validate_json((fields or {}).get("spec") or "")
    except ValueError:
        return None  # no readable spec, so no output keys: only the record goes
