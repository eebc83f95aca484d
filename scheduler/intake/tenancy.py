"""Who created a job: the API key name written on it at submit, the per-key indexes, and the key's live jobs.

A job created through the HTTP front carries ``owner`` (the creating key's name, never the key) and, for a
create with an ``Idempotency-Key``, ``request_digest`` (what the request asked for, so a reuse of the key
with a different body can be told apart). Both are written in the same MULTI as the record itself, so no
job is ever visible without its owner. Jobs from the CLI or cron have no owner: only admin keys see them.

Per key, ``api_owner_index_key(owner, "videos")`` lists its jobs (a user key's ``GET /v1/videos`` reads it)
and ``api_owner_active_key(owner)`` the ones that may still be queued or running; the latter is pruned of
finished and vanished jobs each time it is counted, so it stays as small as the key's admission window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler.core import keys
from scheduler.core.job_record import FINISHED_STATES, read_records
from scheduler.core.jobs import JOB_RETENTION_SECONDS

OWNER_FIELD = "owner"
REQUEST_DIGEST_FIELD = "request_digest"
_FINISHED = {state.value for state in FINISHED_STATES}


def tag_owned_jobs(
    pipe: Any, owner: str, job_ids: Sequence[str], now: float, request_digest: str | None = None
) -> None:
    """In the caller's MULTI ``pipe``: mark ``job_ids`` as ``owner``'s and list them in its indexes."""
    if not job_ids:
        return
    tags = {OWNER_FIELD: owner}
    if request_digest is not None:
        tags[REQUEST_DIGEST_FIELD] = request_digest
    for job_id in job_ids:
        pipe.hset(keys.job_key(job_id), mapping=tags)
    for index in (keys.api_owner_index_key(owner, "videos"), keys.api_owner_active_key(owner)):
        pipe.zadd(index, dict.fromkeys(job_ids, now))
        pipe.expire(index, JOB_RETENTION_SECONDS)


def count_active(conn: Any, owner: str) -> int:
    """How many of ``owner``'s jobs are queued or running now (finished and vanished ones leave the set)."""
    active_key = keys.api_owner_active_key(owner)
    ids = [m.decode() for m in conn.zrange(active_key, 0, -1)]
    done = [
        job_id
        for job_id, fields in read_records(conn, ids, ("state",))
        if fields is None or fields.get("state") in _FINISHED
    ]
    if done:
        conn.zrem(active_key, *done)
    return len(ids) - len(done)
