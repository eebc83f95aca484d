"""Fair admission across API keys: a user key's batch enters the queues only as its own jobs finish.

Why an admission window per key rather than round-robin across keys at the transform queue: the queues,
their claim order and the workers are the route machinery's (rq queues per stage, priority and model);
interleaving keys there would touch every stage's dequeue. Holding back at the front keeps the queues
FIFO and short -- a 200,000-line batch is not 200,000 rq jobs -- and bounds what any other key's job can
find ahead of it to ``max_active_jobs`` of each key, whatever their batches hold.

Lifecycle of a held line (all in Redis, so a restarted front loses nothing):

1. ``hold_back`` (at ``POST /v1/batches``): the lines beyond the key's free room go to the batch's held
   hash (job id -> line and spec) and the key's held set (``<batch>|<line>|<job id>``, FIFO);
2. ``release_held`` (the front's background loop) submits, per key, as many held lines as its window
   has room for -- submit first, then forget the held entry, so a crash in between submits it again,
   which the job id makes a no-op;
3. ``drop_held`` (batch cancel) forgets a batch's held lines: they never become jobs.

Admin keys have no window: their batches are submitted whole, as before.
"""

from __future__ import annotations

import json
import logging
import time

from scheduler.core import keys
from scheduler.core.errors import UserError
from scheduler.core.jobs import JOB_RETENTION_SECONDS
from scheduler.core.spec import JobSpec
from scheduler.http.auth import Caller
from scheduler.http.state import Front
from scheduler.intake.submit import submit
from scheduler.intake.tenancy import count_active
from scheduler.ops.batch_file import BatchEntry

log = logging.getLogger(__name__)


def _member(batch_id: str, line: int, job_id: str) -> str:
    return f"{batch_id}|{line:07d}|{job_id}"


def room_for(front: Front, caller: Caller) -> int | None:
    """How many more of ``caller``'s jobs may enter the queues now; None: no window (admin)."""
    if caller.quota is None:
        return None
    return max(0, caller.quota.max_active_jobs - count_active(front.conn, caller.name))


def hold_back(front: Front, caller: Caller, batch_id: str, entries: list[BatchEntry]) -> list[BatchEntry]:
    """The entries to submit now; the rest are held for ``release_held``, in their order."""
    room = room_for(front, caller)
    if room is None or len(entries) <= room:
        return entries
    admitted, held = entries[:room], entries[room:]
    now = time.time()
    pipe = front.conn.pipeline(transaction=True)
    held_key = keys.api_batch_held_key(batch_id)
    pipe.hset(held_key, mapping={e.job_id: json.dumps({"line": e.line_no, "spec": e.spec.to_json()}) for e in held})
    pipe.expire(held_key, JOB_RETENTION_SECONDS)
    # One score for the whole batch: members of equal score sort by their bytes, the zero-padded line.
    pipe.zadd(keys.api_owner_held_key(caller.name), {_member(batch_id, e.line_no, e.job_id): now for e in held})
    pipe.execute()
    return admitted


def held_job_ids(front: Front, batch_id: str) -> set[str]:
    return {m.decode() for m in front.conn.hkeys(keys.api_batch_held_key(batch_id))}  # type: ignore[union-attr]


def drop_held(front: Front, batch_id: str, owner: str | None) -> set[str]:
    """Forget ``batch_id``'s held lines (a cancel); returns their job ids (which never became jobs)."""
    raw: dict[bytes, bytes] = front.conn.hgetall(keys.api_batch_held_key(batch_id))  # type: ignore[assignment]
    if not raw or owner is None:
        return set()
    members = [_member(batch_id, json.loads(v)["line"], k.decode()) for k, v in raw.items()]
    pipe = front.conn.pipeline(transaction=True)
    pipe.zrem(keys.api_owner_held_key(owner), *members)
    pipe.delete(keys.api_batch_held_key(batch_id))
    pipe.execute()
    return {k.decode() for k in raw}


def release_held(front: Front) -> int:
    """Submit held batch lines of every user key as far as its window has room; returns how many."""
    released = 0
    for caller in front.keys.callers:
        held_key = keys.api_owner_held_key(caller.name) if caller.quota is not None else None
        if held_key is None or not front.conn.zcard(held_key):
            continue
        room = room_for(front, caller) or 0
        for member in [m.decode() for m in front.conn.zrange(held_key, 0, room - 1)] if room else []:  # type: ignore[union-attr]
            batch_id, _, job_id = member.split("|")
            value = front.conn.hget(keys.api_batch_held_key(batch_id), job_id)
            if value is not None:
                item = json.loads(value)
                try:
                    submit(
                        front.conn,
                        front.settings,
                        JobSpec.model_validate_json(item["spec"]),
                        job_id,
                        owner=caller.name,
                    )
                    front.conn.zadd(keys.batch_jobs_key(batch_id), {job_id: item["line"]})
                    released += 1
                except UserError as exc:  # e.g. its image went away meanwhile: the line ends as failed
                    log.warning("held line %s of batch %s refused at admission: %s", item["line"], batch_id, exc)
            pipe = front.conn.pipeline(transaction=True)
            pipe.zrem(held_key, member)
            pipe.hdel(keys.api_batch_held_key(batch_id), job_id)
            pipe.execute()
    return released
