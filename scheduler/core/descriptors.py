"""Room descriptors: the signed, versioned message that says where a stage's output lives.

A producer packs its tensors into one slot of its registered pool and publishes a
descriptor; a consumer verifies it *before* any transfer (see ``verify_descriptor``).
Fields are named and versioned -- never positional -- so a newer farm can read an
older descriptor or refuse it by version with a clear reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DESCRIPTOR_VERSION = 1

# dtypes a descriptor may name, with their item sizes; anything else is refused.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}


class TensorEntry(BaseModel):
    """One tensor inside a slot: where it starts and how to view it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    dtype: Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"]
    shape: tuple[int, ...]
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)

    def expected_nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


class DescriptorRefused(ValueError):
    """A descriptor that must not be transferred from; the message is the room's failure reason."""


class ProducerGone(DescriptorRefused):
    """The producer is no longer a live worker: its output is lost, not forged (recompute upstream)."""


class Descriptor(BaseModel):
    """Where one stage's output lives, signed by the producer with the farm secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = DESCRIPTOR_VERSION
    job_id: str
    producer_stage: str
    attempt: int = Field(ge=1)
    producer_id: str
    endpoint: str
    slot_base: int = Field(ge=0)
    slot_bytes: int = Field(ge=1)
    tensors: tuple[TensorEntry, ...]
    checksum: str
    created_at: float
    lease_expires_at: float

    def canonical_bytes(self) -> bytes:
        # Sorted keys and fixed separators: the signature must not depend on dict order.
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def sign(self, secret: bytes) -> str:
        return hmac.new(secret, self.canonical_bytes(), hashlib.sha256).hexdigest()

    @property
    def payload_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class DescriptorLimits(BaseModel):
    """What a consumer is willing to pull: bounds a forged or buggy descriptor cannot exceed."""

    model_config = ConfigDict(frozen=True)

    max_payload_bytes: int
    max_tensors: int = 16


def parse_and_verify(
    raw_json: str,
    signature: str,
    secret: bytes | Sequence[bytes],
    registered_endpoint: str | None,
    limits: DescriptorLimits,
) -> Descriptor:
    """Check a descriptor completely before any byte is transferred.

    ``registered_endpoint`` is the endpoint the producer registered with its live
    worker record (None when the producer is not a live worker): the consumer
    never connects to an address that only the descriptor vouches for.
    """
    desc = verify_descriptor(raw_json, signature, secret, limits)
    check_producer_endpoint(desc, registered_endpoint)
    return desc


def verify_descriptor(
    raw_json: str, signature: str, secret: bytes | Sequence[bytes], limits: DescriptorLimits
) -> Descriptor:
    """Every check that needs no Redis: version, schema, signature, lease, bounds.

    ``secret`` may be several: the current farm secret and the previous one, while a farm rotates.

    The consumer then checks the producer's registration (``check_producer_endpoint``)
    in the same Redis step that marks the room TRANSFERRING.
    """
    try:
        version = json.loads(raw_json).get("version")
    except (ValueError, AttributeError):
        raise DescriptorRefused("descriptor is not a JSON object") from None
    if version != DESCRIPTOR_VERSION:
        raise DescriptorRefused(
            f"descriptor version {version!r} is not supported (this worker reads {DESCRIPTOR_VERSION})"
        )
    try:
        desc = Descriptor.model_validate_json(raw_json)
    except ValueError as exc:
        raise DescriptorRefused(f"descriptor is malformed: {str(exc).splitlines()[0]}") from None
    accepted = (secret,) if isinstance(secret, bytes) else tuple(secret)
    if not any(hmac.compare_digest(desc.sign(key), signature or "") for key in accepted):
        raise DescriptorRefused("descriptor signature does not match the farm secret")
    if desc.lease_expires_at < time.time():
        raise ProducerGone(f"the producer's lease on this payload expired at {desc.lease_expires_at:.0f}")
    if len(desc.tensors) > limits.max_tensors:
        raise DescriptorRefused(f"descriptor lists {len(desc.tensors)} tensors, over the limit {limits.max_tensors}")
    for entry in desc.tensors:
        if entry.nbytes != entry.expected_nbytes():
            raise DescriptorRefused(f"tensor {entry.name}: nbytes {entry.nbytes} does not match its shape and dtype")
        if entry.offset + entry.nbytes > desc.slot_bytes:
            raise DescriptorRefused(f"tensor {entry.name} lies outside the producer's slot")
    # The consumer reads into its own slot at the same offsets, so the payload's end is what must fit.
    payload_end = max((t.offset + t.nbytes for t in desc.tensors), default=0)
    if payload_end > limits.max_payload_bytes:
        raise DescriptorRefused(f"payload of {payload_end} bytes is over the limit {limits.max_payload_bytes}")
    return desc


def check_producer_endpoint(desc: Descriptor, registered_endpoint: str | None) -> None:
    """The producer must be a live registered worker, at exactly the endpoint the descriptor names."""
    if registered_endpoint is None:
        raise ProducerGone(f"producer {desc.producer_id} is not a live registered worker")
    if registered_endpoint != desc.endpoint:
        raise DescriptorRefused(
            f"descriptor endpoint {desc.endpoint} is not the endpoint producer {desc.producer_id} registered"
        )
