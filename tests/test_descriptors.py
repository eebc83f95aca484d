"""Descriptor verification: every refusal names its reason; a good descriptor passes."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.core.descriptors import (
    Descriptor,
    DescriptorLimits,
    DescriptorRefused,
    ProducerGone,
    TensorEntry,
    parse_and_verify,
)

SECRET = b"farm-secret"
LIMITS = DescriptorLimits(max_payload_bytes=1 << 20)


def make_descriptor(**changes: object) -> Descriptor:
    fields: dict[str, object] = dict(
        job_id="j1",
        producer_stage="encode",
        attempt=1,
        producer_id="encode-host-1",
        endpoint="127.0.0.1:5000",
        slot_base=1 << 30,
        slot_bytes=1 << 20,
        tensors=(TensorEntry(name="prompt_embeds", dtype="float32", shape=(1, 4, 8), offset=0, nbytes=128),),
        checksum="xxh3_128:00",
        created_at=time.time(),
        # Long: parametrized descriptors are built at collection, maybe minutes before the test runs.
        lease_expires_at=time.time() + 86400,
    )
    fields.update(changes)
    return Descriptor.model_validate(fields)


def verify(desc: Descriptor, signature: str | None = None, endpoint: str | None = "127.0.0.1:5000") -> Descriptor:
    return parse_and_verify(desc.model_dump_json(), signature or desc.sign(SECRET), SECRET, endpoint, LIMITS)


def test_good_descriptor_passes() -> None:
    desc = make_descriptor()
    assert verify(desc) == desc


@pytest.mark.parametrize(
    ("desc", "kwargs", "reason"),
    [
        (make_descriptor(), {"signature": "0" * 64}, "signature does not match"),
        (make_descriptor(), {"endpoint": "10.0.0.9:5000"}, "is not the endpoint producer"),
        (make_descriptor(), {"endpoint": None}, "is not a live registered worker"),
        (
            make_descriptor(
                tensors=(TensorEntry(name="x", dtype="uint8", shape=(64,), offset=(1 << 20) - 10, nbytes=64),)
            ),
            {},
            "lies outside the producer's slot",
        ),
        (
            make_descriptor(
                slot_bytes=1 << 22,
                tensors=(TensorEntry(name="x", dtype="uint8", shape=(1 << 21,), offset=0, nbytes=1 << 21),),
            ),
            {},
            "over the limit",
        ),
        (
            make_descriptor(tensors=(TensorEntry(name="x", dtype="float32", shape=(4,), offset=0, nbytes=8),)),
            {},
            "does not match its shape",
        ),
    ],
)
def test_refusals(desc: Descriptor, kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(DescriptorRefused, match=reason):
        verify(desc, **kwargs)  # type: ignore[arg-type]


def test_tampering_after_signing_breaks_the_signature() -> None:
    desc = make_descriptor()
    signature = desc.sign(SECRET)
    tampered = json.loads(desc.model_dump_json())
    tampered["slot_base"] += 4096
    with pytest.raises(DescriptorRefused, match="signature"):
        parse_and_verify(json.dumps(tampered), signature, SECRET, "127.0.0.1:5000", LIMITS)


def test_unknown_version_is_refused_by_version() -> None:
    raw = json.loads(make_descriptor().model_dump_json())
    raw["version"] = 99
    with pytest.raises(DescriptorRefused, match="version 99 is not supported"):
        parse_and_verify(json.dumps(raw), "", SECRET, "127.0.0.1:5000", LIMITS)


@given(st.text(max_size=300))
def test_garbage_is_refused_not_crashing(raw: str) -> None:
    with pytest.raises(DescriptorRefused):
        parse_and_verify(raw, "", SECRET, "127.0.0.1:5000", LIMITS)


def test_expired_lease_means_the_producer_let_go() -> None:
    with pytest.raises(ProducerGone, match="lease on this payload expired"):
        verify(make_descriptor(lease_expires_at=time.time() - 1))
