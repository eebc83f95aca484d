"""Each stage's demand, in one Redis key per stage that an autoscaler reads (KEDA's ``redis`` trigger).

``demand(stage)`` = the stage's rq jobs waiting on any of its queues (every model, every
priority, including ones rq dequeued but no worker started) + its retries parked in a
backoff + its executions in flight + the outputs its workers hold until the next stage
acknowledges them. Scaling on that, a stage scaled to zero wakes as soon as work arrives,
and a stage is never scaled below the workers its running jobs and held outputs need.

The key is a list whose length is the demand, because KEDA's redis scaler measures
``LLEN listName`` and has no trigger for a counter; the entries themselves carry nothing.
It is kept current two ways:

- every enqueue of a stage call pushes onto its stage's list in the enqueue's own
  pipeline (``queues.enqueue_stages``), so demand rises at once -- even with no worker
  running, as when a stage was scaled to zero;
- every maintenance pass (``reaper.reap_once``: every ``worker.reaper_interval_seconds``,
  one process at a time farm-wide) recounts and sets each list to its exact length, so
  demand falls at most one reaper interval after work finished or a worker died. A
  recount racing an enqueue may set the lower count; the next pass corrects it.

Capped at ``DEMAND_CAP`` entries: far beyond any replica count, small in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis

from scheduler.core import keys, worker_registry
from scheduler.core.keys import Stage

DEMAND_CAP = 10_000
# Entries pushed per RPUSH inside the script (Lua's unpack has a stack limit).
_PUSH_CHUNK = 1000
_MARK = "1"

# KEYS: demand list. ARGV: wanted length. Sets the list's length without rewriting what is already there.
_SET_LENGTH = """
local want = tonumber(ARGV[1])
if want <= 0 then redis.call('DEL', KEYS[1]) return 0 end
local have = redis.call('LLEN', KEYS[1])
if have > want then
  redis.call('LTRIM', KEYS[1], 0, want - 1)
else
  local missing = want - have
  while missing > 0 do
    local n = math.min(missing, tonumber(ARGV[2]))
    local batch = {}
    for i = 1, n do batch[i] = ARGV[3] end
    redis.call('RPUSH', KEYS[1], unpack(batch))
    missing = missing - n
  end
end
return want
"""


def add_demand(conn_or_pipe: Any, stage: Stage, count: int) -> None:
    """Raise ``stage``'s demand by ``count`` (new stage calls); joins the caller's pipeline."""
    if count <= 0:
        return
    key = keys.demand_key(stage)
    conn_or_pipe.rpush(key, *([_MARK] * min(count, DEMAND_CAP)))
    conn_or_pipe.ltrim(key, 0, DEMAND_CAP - 1)


def count_demand(conn: redis.Redis, backlog: dict[Stage, int]) -> dict[Stage, int]:
    """Each stage's demand: ``backlog`` (its queued stage jobs, from ``queues.stage_backlog``, which owns
    reading rq's queues) plus what the farm's own records say (see the module docstring)."""
    demand: Counter[Stage] = Counter(backlog)
    parked: list[bytes] = conn.hvals(keys.delayed_calls_key())  # type: ignore[assignment]
    for raw in parked:
        try:
            demand[Stage(json.loads(raw)["stage"])] += 1
        except (ValueError, KeyError, TypeError):
            continue  # an unreadable parked call is the reaper's to report, not a demand
    inflight: list[bytes] = conn.zrange(keys.inflight_key(), 0, -1)  # type: ignore[assignment]
    for member in inflight:
        try:
            demand[keys.parse_inflight_member(member.decode())[1]] += 1
        except ValueError:
            continue
    for record in worker_registry.live_workers(conn):
        held = record.get("held_outputs", "0")
        if record.get("stage") in {s.value for s in Stage} and held.isdigit():
            demand[Stage(record["stage"])] += int(held)
    return {stage: demand[stage] for stage in Stage}


def refresh_demand(conn: redis.Redis, backlog: dict[Stage, int]) -> dict[Stage, int]:
    """Recount every stage's demand (``backlog`` as in ``count_demand``) and set its key to it; returns the counts."""
    counts = count_demand(conn, backlog)
    for stage, count in counts.items():
        conn.eval(_SET_LENGTH, 1, keys.demand_key(stage), min(count, DEMAND_CAP), _PUSH_CHUNK, _MARK)
    return counts


def read_demand(conn: redis.Redis) -> dict[Stage, int]:
    """What an autoscaler sees: the length of each stage's demand key."""
    return {stage: int(conn.llen(keys.demand_key(stage))) for stage in Stage}  # type: ignore[arg-type]
