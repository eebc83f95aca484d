"""The hand-off between stages, one function per side, shared by every stage.

Producer: 1. take a slot (backpressure already made sure one is free) 2. pack
3. sign a descriptor 4. hold the slot until ack or lease expiry -- publishing the
room happens in the caller's pipeline together with the next stage's enqueue.

Consumer: 1. claim the room (the claim returns the descriptor) 2. verify the
descriptor (signature, lease, bounds) 3. check that the producer is live at the
registered endpoint and mark TRANSFERRING, in one Redis step 4. batch-read into
fresh private memory (TCP) and verify it -- the stage's tensors are views of it --
or, on RDMA, into an own registered slot, copy out, verify the copies and free the
slot 5. ack. Four Redis round trips per hand-off, the producer's publish included.
Any refusal marks the room FAILED with its reason and raises ``HandoffError``;
the worker itself keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from scheduler.core import keys, worker_metrics
from scheduler.core.descriptors import (
    Descriptor,
    DescriptorRefused,
    ProducerGone,
    check_producer_endpoint,
    verify_descriptor,
)
from scheduler.core.keys import Hop
from scheduler.core.rooms import RoomState
from workers.runtime import StageRuntime
from workers.transfer.mooncake_engine import TransferError
from workers.transfer.packing import (
    ChecksumMismatch,
    PayloadTooLarge,
    pack_tensors,
    payload_end,
    unpack_verified,
    views_verified,
)
from workers.transfer.slot_pool import ReadDestination, fresh_landing_buffer, pull_payload

log = logging.getLogger("reelfarm.handoff")

SLOT_WAIT_SECONDS = 60.0


class HandoffError(RuntimeError):
    """A hand-off that cannot complete; the message is the job's failure reason."""


class InputLost(HandoffError):
    """The input is gone (producer died, lease ran out, transfer or checksum failed): recompute upstream."""


class InputRefused(HandoffError):
    """The descriptor failed a security or bounds check: no retry can make it trustworthy."""


def stage_output(
    rt: StageRuntime, job_id: str, attempt: int, tensors: dict[str, torch.Tensor], hop: Hop | None = None
) -> tuple[Descriptor, str]:
    """Pack ``tensors`` -- the output of ``hop`` (default: the worker's stage) -- into a held slot and return
    the signed descriptor (not yet published)."""
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
        producer_stage=(hop or rt.stage).value,
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
    rt.hold_slot(keys.room_key(job_id, hop or rt.stage, attempt), slot.index, desc.lease_expires_at)
    return desc, desc.sign(rt.secret)


def pull_input(rt: StageRuntime, job_id: str, upstream: Hop, upstream_attempt: int) -> dict[str, torch.Tensor]:
    room_key = keys.room_key(job_id, upstream, upstream_attempt)
    room = claim_room(rt, room_key)
    try:
        return _verified_pull(rt, room_key, room, job_id, upstream, upstream_attempt)
    finally:
        rt.end_claim(room_key)


def claim_room(rt: StageRuntime, room_key: str) -> dict[str, str]:
    """Claim and return the room, waiting out a claim whose holder died (its lease lapses within one worker TTL)."""
    lease = rt.settings.worker.worker_ttl_seconds
    deadline = time.monotonic() + lease + 1.0
    while True:
        room = rt.rooms.claim_and_read(room_key, rt.worker_id, lease)
        if room is not None:
            rt.begin_claim(room_key)
            return room
        state = rt.rooms.state(room_key)
        if state not in (RoomState.CLAIMED, RoomState.TRANSFERRING) or time.monotonic() > deadline:
            raise InputLost(f"input room {room_key} cannot be claimed (state {state.name})")
        time.sleep(0.2)


def _verified_pull(
    rt: StageRuntime, room_key: str, room: dict[str, str], job_id: str, upstream: Hop, upstream_attempt: int
) -> dict[str, torch.Tensor]:
    rooms = rt.rooms
    try:
        desc = verify_descriptor(
            room.get("descriptor", ""), room.get("signature", ""), rt.accepted_secrets, rt.descriptor_limits
        )
        if desc.job_id != job_id or desc.producer_stage != upstream.value or desc.attempt != upstream_attempt:
            raise DescriptorRefused("descriptor belongs to another room")
        state, registered_endpoint = rooms.begin_transfer(room_key, rt.worker_id, desc)
        check_producer_endpoint(desc, registered_endpoint)
    except DescriptorRefused as exc:
        rooms.fail(room_key, str(exc))
        log.warning("refused room %s: %s", room_key, exc)
        raise (InputLost if isinstance(exc, ProducerGone) else InputRefused)(str(exc)) from None
    if state is not RoomState.TRANSFERRING:
        raise InputLost(f"room {room_key} was taken over before the transfer (claim lease lapsed; now {state.name})")
    started = time.monotonic()
    tensors = _read_payload(rt, room_key, desc)
    worker_metrics.observe_handoff(rt.stage, desc.payload_nbytes, time.monotonic() - started)
    if not rooms.ack(room_key, rt.worker_id, desc.producer_id):
        raise InputLost(f"room {room_key} was taken over before the ack (claim lease lapsed)")
    return tensors


def _read_payload(rt: StageRuntime, room_key: str, desc: Descriptor) -> dict[str, torch.Tensor]:
    if rt.engine.reads_into_private_memory:
        return _read_into_private_memory(rt, room_key, desc)
    return _read_through_slot(rt, room_key, desc)


def _read_into_private_memory(rt: StageRuntime, room_key: str, desc: Descriptor) -> dict[str, torch.Tensor]:
    """TCP: the payload lands in fresh private memory and the stage's tensors are views of it -- no copy."""
    landing = fresh_landing_buffer(payload_end(desc.tensors))
    with rt.engine.private_destination(landing.ptr, max(landing.nbytes, 1)):
        _pull(rt, room_key, desc, landing)
    return _checked(
        rt, room_key, lambda: views_verified(landing, desc.tensors, desc.checksum, rt.settings.worker.device)
    )


def _read_through_slot(rt: StageRuntime, room_key: str, desc: Descriptor) -> dict[str, torch.Tensor]:
    """RDMA (registered destinations only): read into an own receive slot, copy out, verify the copies."""
    slot = rt.pool.acquire(timeout=SLOT_WAIT_SECONDS)
    if slot is None:
        raise InputLost("no free receive slot in this worker's pool")
    try:
        _pull(rt, room_key, desc, slot)
        # The checksum names its algorithm, so producer and consumer need not share a default.
        return _checked(
            rt, room_key, lambda: unpack_verified(slot, desc.tensors, desc.checksum, rt.settings.worker.device)
        )
    finally:
        rt.pool.release(slot.index)


def _pull(rt: StageRuntime, room_key: str, desc: Descriptor, destination: ReadDestination) -> None:
    try:
        pull_payload(rt.engine, desc.endpoint, desc.slot_base, desc.tensors, destination)
    except (TransferError, PayloadTooLarge) as exc:
        reason = f"transfer from {desc.producer_id} at {desc.endpoint} failed: {exc}"
        rt.rooms.fail(room_key, reason)
        raise InputLost(reason) from None


def _checked(
    rt: StageRuntime, room_key: str, verified: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The tensors ``verified`` returns, or the room FAILED and ``InputLost`` when their checksum is wrong."""
    try:
        return verified()
    except ChecksumMismatch as exc:
        rt.rooms.fail(room_key, str(exc))
        raise InputLost(str(exc)) from None
