"""A worker's registered buffer pool: fixed-size slots carved from one buffer registered once.

Registering memory with the transfer engine is slow (and, with RDMA, pins pages),
so a worker does it exactly once at startup for one contiguous buffer of
``num_slots * slot_bytes`` bytes and never per job. A slot is the unit of
backpressure: a worker that cannot get a slot takes no new job.

Producer lifecycle:
  1. ``acquire`` a slot (blocks while all are lent out)  2. pack the stage's
  tensors into it  3. publish the descriptor (``base_ptr``-relative addresses are
  absolute: ``slot.ptr``)  4. ``release`` the slot when the consumer acknowledges
  or the lease runs out.

Consumer lifecycle (receive side, in the consumer's OWN pool; only where the
engine cannot read into private memory -- otherwise the consumer reads into a
fresh ``LandingBuffer`` and needs no slot):
  1. ``acquire`` a slot  2. ``pull_payload`` the producer's spans into it at the
  same offsets  3. ``unpack_verified`` (copies out, verifies the copies)  4.
  ``release`` at once -- the unpacked tensors own their memory.

``close`` unregisters the buffer; slots must not be used afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from scheduler.core.descriptors import TensorEntry
from workers.transfer.packing import PayloadTooLarge, payload_end, transfer_spans

logger = logging.getLogger(__name__)


class MemoryRegistrar(Protocol):
    """What the pool needs from a transfer engine (``MooncakeEngine`` is one)."""

    def register(self, ptr: int, nbytes: int) -> None: ...

    def unregister(self, ptr: int) -> None: ...


class BatchReader(Protocol):
    """What ``pull_payload`` needs from a transfer engine (``MooncakeEngine`` is one)."""

    def batch_read(
        self,
        peer_endpoint: str,
        local_ptrs: Sequence[int],
        remote_ptrs: Sequence[int],
        lengths: Sequence[int],
    ) -> None: ...


@dataclass(frozen=True)
class Slot:
    """One lent-out slot: ``ptr`` is the absolute address of its first byte."""

    index: int
    ptr: int
    nbytes: int
    _bytes: torch.Tensor = field(repr=False, compare=False)

    def view(self) -> torch.Tensor:
        """A uint8 tensor over the slot's bytes (shares memory with the registered buffer)."""
        return self._bytes


class SlotPool:
    """``num_slots`` slots of ``slot_bytes`` each, in one buffer registered with ``engine`` once."""

    def __init__(self, engine: MemoryRegistrar, slot_bytes: int, num_slots: int) -> None:
        if slot_bytes <= 0 or num_slots <= 0:
            raise ValueError(f"a slot pool needs positive sizes, got slot_bytes={slot_bytes}, num_slots={num_slots}")
        self._engine = engine
        self._slot_bytes = slot_bytes
        self._num_slots = num_slots
        # zeros, not empty: touching every page now commits the memory at startup (an overcommitted host
        # fails here, not mid-job) and keeps page faults out of the first job's pack and pull.
        self._buffer = torch.zeros(slot_bytes * num_slots, dtype=torch.uint8)
        self._base_ptr = self._buffer.data_ptr()
        engine.register(self._base_ptr, self._buffer.numel())
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out slot 0 first
        self._cond = threading.Condition()
        self._closed = False

    @property
    def base_ptr(self) -> int:
        return self._base_ptr

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def free_count(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, timeout: float | None = None) -> Slot | None:
        """Lend a free slot, waiting up to ``timeout`` seconds (forever if None); None if none came free."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._free:
                if self._closed:
                    raise RuntimeError("the slot pool is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._closed:
                raise RuntimeError("the slot pool is closed")
            return self._slot(self._free.pop())

    def wait_for_free(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until a slot is free, without taking it; False if none came free."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._free), timeout)

    def release(self, slot_index: int) -> None:
        """Return a slot. Releasing a slot that is already free is a logged no-op (acks can be repeated)."""
        if not 0 <= slot_index < self._num_slots:
            raise ValueError(f"slot index {slot_index} is outside this pool of {self._num_slots} slots")
        with self._cond:
            if slot_index in self._free:
                logger.warning("slot %d released while already free; ignoring", slot_index)
                return
            self._free.append(slot_index)
            # All, not one: a `wait_for_free` waiter takes no slot, so waking only it could leave an
            # `acquire` asleep beside a free slot.
            self._cond.notify_all()

    def slot(self, slot_index: int) -> Slot:
        """The slot at ``slot_index`` whether lent or not (for a producer that kept only the index)."""
        if not 0 <= slot_index < self._num_slots:
            raise ValueError(f"slot index {slot_index} is outside this pool of {self._num_slots} slots")
        return self._slot(slot_index)

    def close(self) -> None:
        """Unregister the buffer; idempotent. Waiting acquirers get a RuntimeError."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._engine.unregister(self._base_ptr)

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _slot(self, index: int) -> Slot:
        start = index * self._slot_bytes
        return Slot(
            index=index,
            ptr=self._base_ptr + start,
            nbytes=self._slot_bytes,
            _bytes=self._buffer[start : start + self._slot_bytes],
        )


# Touching one byte per page commits a fresh buffer's memory before a transfer writes into it.
PAGE_BYTES = 4096


class ReadDestination(Protocol):
    """Local memory a payload is read into: a registered ``Slot`` or a private ``LandingBuffer``."""

    @property
    def ptr(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class LandingBuffer:
    """Private memory a payload is read straight into (TCP only): never registered, so never served to peers.

    Each hand-off gets a fresh one; the stage's input tensors are views of it, so it
    lives exactly as long as they do.
    """

    ptr: int
    nbytes: int
    _bytes: torch.Tensor = field(repr=False, compare=False)

    def view(self) -> torch.Tensor:
        return self._bytes


def fresh_landing_buffer(nbytes: int) -> LandingBuffer:
    """A new private buffer of ``nbytes`` with its pages committed."""
    data = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    # Commit the pages now rather than inside the transfer: the cost shows up as its own step and
    # the read itself runs as fast as one into the registered pool.
    data[::PAGE_BYTES].zero_()
    return LandingBuffer(ptr=data.data_ptr(), nbytes=nbytes, _bytes=data[:nbytes])


def pull_payload(
    engine: BatchReader,
    peer_endpoint: str,
    remote_slot_ptr: int,
    entries: Sequence[TensorEntry],
    local_slot: ReadDestination,
) -> int:
    """Read a producer's payload into ``local_slot`` at the same offsets, in one batch; returns bytes read.

    ``entries`` must already be verified against the descriptor's slot bounds; this
    only refuses a payload that would not fit the local slot.
    """
    end = payload_end(entries)
    if end > local_slot.nbytes:
        raise PayloadTooLarge(f"payload ends at byte {end}, past this worker's {local_slot.nbytes}-byte slot")
    spans = transfer_spans(entries)
    if not spans:
        return 0
    engine.batch_read(
        peer_endpoint,
        [local_slot.ptr + offset for offset, _ in spans],
        [remote_slot_ptr + offset for offset, _ in spans],
        [nbytes for _, nbytes in spans],
    )
    return sum(nbytes for _, nbytes in spans)
