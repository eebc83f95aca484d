"""Rooms: the meeting point of a producing stage and the stage after it.

A room holds one signed descriptor for one attempt of one stage's output and a
small forward-only state machine::

    PUBLISHED < CLAIMED < TRANSFERRING < ACKED (final)    FAILED (terminal, sticky)

Every transition is a single Lua script, so a crash can never leave a room half
moved, and two consumers racing for a room see exactly one winner.

Consumer lifecycle: 1. ``claim_and_read`` (claim and get the descriptor in one
round trip) 2. verify the descriptor 3. ``begin_transfer`` (producer still live at
the descriptor's endpoint, and TRANSFERRING, in one step) 4. pull + verify
(workers/) 5. ``ack`` (also tells the producer, via its ack list, to free the
slot). Any refusal: ``fail`` with the reason.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any

import redis

from scheduler.core import keys
from scheduler.core.descriptors import Descriptor
from scheduler.core.keys import Hop

ROOM_RETENTION_SECONDS = 24 * 3600


class RoomState(IntEnum):
    FAILED = -1
    MISSING = 0
    PUBLISHED = 1
    CLAIMED = 2
    TRANSFERRING = 3
    ACKED = 4


# Moves a room forward only. ARGV: target state, required holder ('' = any), then field/value pairs.
# Returns the state the room is in afterwards; the caller compares it with its target.
_ADVANCE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
local target = tonumber(ARGV[1])
-- FAILED is sticky and ACKED is final: neither ever moves again.
if cur == -1 or cur == 0 or cur == 4 then return cur end
if target ~= -1 and target <= cur then return cur end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[2] then return cur end
redis.call('HSET', KEYS[1], 'state', target)
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return target
"""

# A room can be claimed when published, or when its claim lease ran out (holder died). The winner gets
# the room back in the same round trip: it needs the descriptor next.
_CLAIM_AND_READ = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
local now = tonumber(ARGV[2])
if cur == 1 or ((cur == 2 or cur == 3) and tonumber(redis.call('HGET', KEYS[1], 'claim_expires_at')) < now) then
  redis.call('HSET', KEYS[1], 'state', 2, 'claimed_by', ARGV[1], 'claimed_at', ARGV[2], 'claim_expires_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'claims', 1)
  return redis.call('HGETALL', KEYS[1])
end
return false
"""

# CLAIMED -> TRANSFERRING, only for the holder and only while the producer is a live worker of the
# expected stage: the producer check and the transition are one step, so the worker record read is
# the one the transfer relies on. Returns {state afterwards, endpoint the producer registered or ''};
# the caller compares that endpoint with the descriptor's (no transition happens on a mismatch).
# KEYS: room, producer's worker record. ARGV: claimer, producer stage, descriptor endpoint, now.
_BEGIN_TRANSFER = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
local producer = redis.call('HMGET', KEYS[2], 'stage', 'endpoint')
if producer[1] ~= ARGV[2] or not producer[2] then return {cur, ''} end
if producer[2] ~= ARGV[3] then return {cur, producer[2]} end
if cur ~= 2 or redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[1] then return {cur, producer[2]} end
redis.call('HSET', KEYS[1], 'state', 3, 'transfer_started_at', ARGV[4])
return {3, producer[2]}
"""

# Extend a claim while its holder is alive (called from the holder's heartbeat thread).
_RENEW = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if (cur == 2 or cur == 3) and redis.call('HGET', KEYS[1], 'claimed_by') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'claim_expires_at', ARGV[2])
  return 1
end
return 0
"""

# Acknowledge and tell the producer in one step: the slot is freed exactly when the room is ACKED.
_ACK = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'state') or '0')
if cur ~= 3 or redis.call('HGET', KEYS[1], 'claimed_by') ~= ARGV[1] then return cur end
redis.call('HSET', KEYS[1], 'state', 4, 'acked_at', ARGV[2])
redis.call('LPUSH', KEYS[2], KEYS[1])
return 4
"""


class Rooms:
    """Room operations bound to one Redis connection."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self._advance = conn.register_script(_ADVANCE)
        self._claim_and_read = conn.register_script(_CLAIM_AND_READ)
        self._begin_transfer = conn.register_script(_BEGIN_TRANSFER)
        self._ack = conn.register_script(_ACK)
        self._renew = conn.register_script(_RENEW)

    def publish(self, desc: Descriptor, signature: str, pipeline: Any | None = None) -> str:
        """Write the room for ``desc``; joins the caller's pipeline so the next stage's enqueue is atomic with it."""
        key = keys.room_key(desc.job_id, Hop(desc.producer_stage), desc.attempt)
        pipe = pipeline if pipeline is not None else self.conn.pipeline()
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "state": int(RoomState.PUBLISHED),
                "descriptor": desc.model_dump_json(),
                "signature": signature,
                "producer_id": desc.producer_id,
                "published_at": repr(time.time()),
            },
        )
        pipe.expire(key, ROOM_RETENTION_SECONDS)
        if pipeline is None:
            pipe.execute()
        return key

    def read(self, key: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.conn.hgetall(key)  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def state(self, key: str) -> RoomState:
        value = self.conn.hget(key, "state")
        return RoomState(int(value)) if value is not None else RoomState.MISSING  # type: ignore[arg-type]

    def claim(self, key: str, claimer: str, lease_seconds: float) -> bool:
        return self.claim_and_read(key, claimer, lease_seconds) is not None

    def claim_and_read(self, key: str, claimer: str, lease_seconds: float) -> dict[str, str] | None:
        """Claim the room; its fields when this claim won, None when the room cannot be claimed."""
        now = time.time()
        flat = self._claim_and_read(keys=[key], args=[claimer, repr(now), repr(now + lease_seconds)])
        if not flat:
            return None
        items = [item.decode() for item in flat]
        return dict(zip(items[::2], items[1::2], strict=True))

    def begin_transfer(self, key: str, claimer: str, desc: Descriptor) -> tuple[RoomState, str | None]:
        """Mark TRANSFERRING if ``claimer`` holds the room and ``desc``'s producer is live at ``desc.endpoint``.

        Returns the room's state afterwards and the endpoint the producer registered
        (None when it is not a live worker of the descriptor's stage).
        """
        state, endpoint = self._begin_transfer(
            keys=[key, keys.worker_key(desc.producer_id)],
            # Workers register their stage kind; the descriptor names the hop (``transform@high``).
            args=[claimer, Hop(desc.producer_stage).kind.value, desc.endpoint, repr(time.time())],
        )
        return RoomState(int(state)), (endpoint.decode() or None)

    def renew_claim(self, key: str, claimer: str, lease_seconds: float) -> bool:
        return bool(self._renew(keys=[key], args=[claimer, repr(time.time() + lease_seconds)]))

    def mark_transferring(self, key: str, claimer: str) -> bool:
        got = self._advance(
            keys=[key], args=[int(RoomState.TRANSFERRING), claimer, "transfer_started_at", repr(time.time())]
        )
        return int(got) == RoomState.TRANSFERRING

    def ack(self, key: str, claimer: str, producer_id: str) -> bool:
        got = self._ack(keys=[key, keys.acks_key(producer_id)], args=[claimer, repr(time.time())])
        return int(got) == RoomState.ACKED

    def fail(self, key: str, reason: str) -> RoomState:
        got = self._advance(
            keys=[key], args=[int(RoomState.FAILED), "", "reason", reason, "failed_at", repr(time.time())]
        )
        return RoomState(int(got))

    def release_input(self, job_id: str, upstream: Hop | None, upstream_attempt: int) -> None:
        """Give up a stage's unclaimed input room, the output of hop ``upstream`` (the hop before it on the
        job's route; None for the first hop): fail it and tell its producer to free the slot now.

        For a stage that will never run (cancelled while queued, or dequeued with a
        cancel requested); without it the producer holds the slot until its lease runs out.
        """
        if upstream is None:
            return
        room_key = keys.room_key(job_id, upstream, upstream_attempt)
        producer = self.read(room_key).get("producer_id")
        if self.fail(room_key, "job cancelled before the next stage pulled it") is RoomState.FAILED and producer:
            self.conn.lpush(keys.acks_key(producer), room_key)
