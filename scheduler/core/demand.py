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

Per hop, and per stage kind over all its hops: ``reelfarm:demand:transform`` counts every transform
hop (the plain transform workers serve them all, a split loop's parts included), while
``reelfarm:demand:transform@high`` counts that hop alone (for a pool that serves only it).

Capped at ``DEMAND_CAP`` entries: far beyond any replica count, small in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis

from scheduler.core import keys, worker_registry
from scheduler.core.keys import Hop, Stage

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


def add_demand(conn_or_pipe: Any, stage: Hop, count: int) -> None:
    """Raise ``stage``'s demand by ``count`` (new stage calls); joins the caller's pipeline."""
    if count <= 0:
        return
    for pool in _pools(stage):
        key = keys.demand_key(pool)
        conn_or_pipe.rpush(key, *([_MARK] * min(count, DEMAND_CAP)))
        conn_or_pipe.ltrim(key, 0, DEMAND_CAP - 1)


def _pools(hop: Hop) -> tuple[Hop, ...]:
    """The demand keys a hop's work counts in: its own, and its stage kind's when it has a part."""
    return (hop,) if hop.part is None else (hop, hop.kind)


def count_demand(conn: redis.Redis, backlog: dict[Hop, int]) -> dict[Hop, int]:
    """What ``refresh_demand`` sets the keys to (part hops shown where they have any)."""
    return _shown(_count_every_hop(conn, backlog))


def _count_every_hop(conn: redis.Redis, backlog: dict[Hop, int]) -> dict[Hop, int]:
    """Each stage's demand: ``backlog`` (its queued stage jobs, from ``queues.stage_backlog``, which owns
    reading rq's queues) plus what the farm's own records say (see the module docstring)."""
    demand: Counter[Hop] = Counter(backlog)
    parked: list[bytes] = conn.hvals(keys.delayed_calls_key())  # type: ignore[assignment]
    for raw in parked:
        try:
            demand[Hop(json.loads(raw)["stage"])] += 1
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
        # Held outputs count toward the producing worker's stage kind (the hop with no part).
        if record.get("stage") in {s.value for s in Stage} and held.isdigit():
            demand[Stage(record["stage"])] += int(held)
    counts = {hop: demand[hop] for hop in keys.all_hops()}
    for hop in keys.all_hops():
        if hop.part is not None:
            counts[hop.kind] += demand[hop]
    return counts


def refresh_demand(conn: redis.Redis, backlog: dict[Hop, int]) -> dict[Hop, int]:
    """Recount every stage's demand (``backlog`` as in ``count_demand``) and set its key to it; returns the counts."""
    counts = _count_every_hop(conn, backlog)
    for stage, count in counts.items():  # every hop's key, so a part hop's demand falls back to zero too
        conn.eval(_SET_LENGTH, 1, keys.demand_key(stage), min(count, DEMAND_CAP), _PUSH_CHUNK, _MARK)
    return _shown(counts)


def read_demand(conn: redis.Redis) -> dict[Hop, int]:
    """What an autoscaler sees: the length of each stage's demand key."""
    return _shown({hop: int(conn.llen(keys.demand_key(hop))) for hop in keys.all_hops()})  # type: ignore[arg-type]


def _shown(counts: dict[Hop, int]) -> dict[Hop, int]:
    """Every stage kind always; a part hop (transform@high) where it has demand, as `reelfarm info` shows queues."""
    return {hop: n for hop, n in counts.items() if n or hop.part is None}
