"""The hand-off between stages, one function per side, shared by every stage.

Producer: 1. take a slot (backpressure already made sure one is free) 2. pack
3. sign a descriptor 4. hold the slot until ack or lease expiry -- publishing the
room happens in the caller's pipeline together with the next stage's enqueue.

Consumer: 1. claim the room 2. verify the descriptor (signature, live producer,
registered endpoint, bounds) 3. mark TRANSFERRING 4. batch-read into an own
slot 5. verify the checksum 6. unpack (copies out) and free the own slot 7. ack.
Any refusal marks the room FAILED with its reason and raises ``HandoffError``;
the worker itself keeps serving.
"""

from __future__ import annotations

import logging
import time

import torch

from scheduler import keys, metrics, worker_registry
from scheduler.descriptors import Descriptor, DescriptorRefused, ProducerGone, parse_and_verify
from scheduler.keys import Stage
from scheduler.rooms import RoomState
from workers.runtime import StageRuntime
from workers.transfer.mooncake_engine import TransferError
from workers.transfer.packing import ChecksumMismatch, PayloadTooLarge, pack_tensors, unpack_tensors, verify_checksum
from workers.transfer.slot_pool import pull_payload

log = logging.getLogger("reelfarm.handoff")

SLOT_WAIT_SECONDS = 60.0


class HandoffError(RuntimeError):
    """A hand-off that cannot complete; the message is the job's failure reason."""


class InputLost(HandoffError):
    """The input is gone (producer died, lease ran out, transfer or checksum failed): recompute upstream."""


class InputRefused(HandoffError):
    """The descriptor failed a security or bounds check: no retry can make it trustworthy."""


def stage_output(
    rt: StageRuntime, job_id: str, attempt: int, tensors: dict[str, torch.Tensor]
) -> tuple[Descriptor, str]:
    """Pack ``tensors`` into a held slot and return the signed descriptor (not yet published)."""
    slot = rt.pool.acquire(timeout=SLOT_WAIT_SECONDS)
    if slot is None:
        raise HandoffError(f"no free transfer slot after {SLOT_WAIT_SECONDS:.0f}s (all held for consumers)")
    try:
        entries, checksum = pack_tensors(tensors, slot)
    except Exception:
        rt.pool.release(slot.index)
        raise
    now = time.time()
    desc = Descriptor(
        job_id=job_id,
        producer_stage=rt.stage.value,
        attempt=attempt,
        producer_id=rt.worker_id,
        endpoint=rt.engine.endpoint,
        slot_base=slot.ptr,
        slot_bytes=slot.nbytes,
        tensors=tuple(entries),
        checksum=checksum,
        created_at=now,
        lease_expires_at=now + rt.settings.worker.lease_seconds,
    )
    # Hold before publishing: the ack may arrive the moment the room is visible.
    rt.hold_slot(keys.room_key(job_id, rt.stage, attempt), slot.index, desc.lease_expires_at)
    return desc, desc.sign(rt.secret)


def pull_input(rt: StageRuntime, job_id: str, upstream: Stage, upstream_attempt: int) -> dict[str, torch.Tensor]:
    room_key = keys.room_key(job_id, upstream, upstream_attempt)
    claim_room(rt, room_key)
    try:
        return _verified_pull(rt, room_key, job_id, upstream, upstream_attempt)
    finally:
        rt.end_claim(room_key)


def claim_room(rt: StageRuntime, room_key: str) -> None:
    """Claim, waiting out a claim whose holder died (its lease lapses within one worker TTL)."""
    lease = rt.settings.worker.worker_ttl_seconds
    deadline = time.monotonic() + lease + 1.0
    while True:
        if rt.rooms.claim(room_key, rt.worker_id, lease):
            rt.begin_claim(room_key)
            return
        state = rt.rooms.state(room_key)
        if state not in (RoomState.CLAIMED, RoomState.TRANSFERRING) or time.monotonic() > deadline:
            raise InputLost(f"input room {room_key} cannot be claimed (state {state.name})")
        time.sleep(0.2)


def _verified_pull(
    rt: StageRuntime, room_key: str, job_id: str, upstream: Stage, upstream_attempt: int
) -> dict[str, torch.Tensor]:
    rooms = rt.rooms
    room = rooms.read(room_key)
    producer = worker_registry.get_worker(rt.conn, room.get("producer_id", ""))
    endpoint = producer.get("endpoint") if producer and producer.get("stage") == upstream.value else None
    try:
        desc = parse_and_verify(
            room.get("descriptor", ""), room.get("signature", ""), rt.secret, endpoint, rt.descriptor_limits
        )
        if desc.job_id != job_id or desc.producer_stage != upstream.value or desc.attempt != upstream_attempt:
            raise DescriptorRefused("descriptor belongs to another room")
    except DescriptorRefused as exc:
        rooms.fail(room_key, str(exc))
        log.warning("refused room %s: %s", room_key, exc)
        raise (InputLost if isinstance(exc, ProducerGone) else InputRefused)(str(exc)) from None
    rooms.mark_transferring(room_key, rt.worker_id)
    started = time.monotonic()
    tensors = _read_payload(rt, room_key, desc)
    metrics.observe_handoff(rt.stage, desc.payload_nbytes, time.monotonic() - started)
    if not rooms.ack(room_key, rt.worker_id, desc.producer_id):
        raise InputLost(f"room {room_key} was taken over before the ack (claim lease lapsed)")
    return tensors


def _read_payload(rt: StageRuntime, room_key: str, desc: Descriptor) -> dict[str, torch.Tensor]:
    slot = rt.pool.acquire(timeout=SLOT_WAIT_SECONDS)
    if slot is None:
        raise InputLost("no free receive slot in this worker's pool")
    entries = list(desc.tensors)
    try:
        try:
            pull_payload(rt.engine, desc.endpoint, desc.slot_base, entries, slot)
        except (TransferError, PayloadTooLarge) as exc:
            reason = f"transfer from {desc.producer_id} at {desc.endpoint} failed: {exc}"
            rt.rooms.fail(room_key, reason)
            raise InputLost(reason) from None
        try:
            # The checksum names its algorithm, so producer and consumer need not share a default.
            verify_checksum(slot.view(), entries, desc.checksum)
        except ChecksumMismatch as exc:
            rt.rooms.fail(room_key, str(exc))
            raise InputLost(str(exc)) from None
        return unpack_tensors(slot, entries, device=rt.settings.worker.device)
    finally:
        rt.pool.release(slot.index)
