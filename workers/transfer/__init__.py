"""The tensor hand-off between stage workers: Mooncake engine, registered slot pool, payload packing.

Only ``mooncake_engine`` imports mooncake, and only when an engine is built, so
importing this package needs no transfer engine installed.
"""

from workers.transfer.mooncake_engine import MooncakeEngine, TransferError
from workers.transfer.packing import (
    ALIGNMENT,
    ChecksumMismatch,
    PayloadTooLarge,
    pack_tensors,
    payload_checksum,
    payload_end,
    payload_nbytes,
    transfer_spans,
    unpack_tensors,
    unpack_verified,
    verify_checksum,
    views_verified,
)
from workers.transfer.slot_pool import LandingBuffer, Slot, SlotPool, pull_payload

__all__ = [
    "ALIGNMENT",
    "ChecksumMismatch",
    "LandingBuffer",
    "MooncakeEngine",
    "PayloadTooLarge",
    "Slot",
    "SlotPool",
    "TransferError",
    "pack_tensors",
    "payload_checksum",
    "payload_end",
    "payload_nbytes",
    "pull_payload",
    "transfer_spans",
    "unpack_tensors",
    "unpack_verified",
    "verify_checksum",
    "views_verified",
]
