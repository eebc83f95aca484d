"""The tensor hand-off over real Mooncake TCP on loopback, with producer and consumer in two processes.

The producer runs in a child process (this file run as a script: ``python
tests/test_transfer.py producer``) and answers JSON lines on stdin/stdout; the
test process is the consumer, with its own engine and its own pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.descriptors import TensorEntry
from workers.transfer import (
    ALIGNMENT,
    ChecksumMismatch,
    MooncakeEngine,
    PayloadTooLarge,
    SlotPool,
    TransferError,
    pack_tensors,
    payload_checksum,
    payload_end,
    payload_nbytes,
    pull_payload,
    transfer_spans,
    unpack_tensors,
    unpack_verified,
    verify_checksum,
    views_verified,
)
from workers.transfer.packing import COPY_HASH_CHUNK
from workers.transfer.slot_pool import fresh_landing_buffer

# real Mooncake engines in several processes
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SLOT_BYTES = 1 << 20


def make_payload(seed: int) -> dict[str, torch.Tensor]:
    """The tensors an encode worker hands on (small latents), deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, 512, 32, generator=gen).to(torch.bfloat16),
        "negative_prompt_embeds": torch.randn(1, 512, 32, generator=gen).to(torch.bfloat16),
        "latents": torch.randn(1, 16, 3, 8, 10, generator=gen),
    }


def bytes_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class ByteBuffer:
    """A slot stand-in that needs no engine, for layout-only tests."""

    def __init__(self, nbytes: int) -> None:
        self._bytes = torch.zeros(nbytes, dtype=torch.uint8)

    def view(self) -> torch.Tensor:
        return self._bytes


# -- the producer process ---------------------------------------------------------------


def _producer_main() -> None:
    engine = MooncakeEngine()
    pool = SlotPool(engine, SLOT_BYTES, num_slots=2)
    reply = {"endpoint": engine.endpoint, "base_ptr": pool.base_ptr, "pool_bytes": SLOT_BYTES * 2}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "pack":
            slot = pool.acquire(timeout=5)
            assert slot is not None
            tensors = make_payload(request["seed"])
            entries, checksum = pack_tensors(tensors, slot)
            reply = {
                "slot_index": slot.index,
                "slot_ptr": slot.ptr,
                "entries": [e.model_dump(mode="json") for e in entries],
                "checksum": checksum,
                "digests": {name: bytes_digest(t) for name, t in tensors.items()},
            }
        elif request["op"] == "release":
            pool.release(request["slot_index"])
            reply = {"free": pool.free_count}
        else:
            break
        print(json.dumps(reply), flush=True)
    pool.close()
    engine.close()


class Producer:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), MC_LOG_LEVEL="ERROR")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "producer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )
        hello = self._recv()
        self.endpoint: str = hello["endpoint"]
        self.base_ptr: int = hello["base_ptr"]
        self.pool_bytes: int = hello["pool_bytes"]

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"producer process exited with {self.proc.wait(5)}")
        return dict(json.loads(line))

    def call(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def producer() -> Iterator[Producer]:
    prod = Producer()
    yield prod
    prod.stop()


@pytest.fixture(scope="module")
def consumer() -> Iterator[tuple[MooncakeEngine, SlotPool]]:
    engine = MooncakeEngine()
    pool = SlotPool(engine, SLOT_BYTES, num_slots=2)
    yield engine, pool
    pool.close()
    engine.close()


def pull_and_check(producer: Producer, engine: MooncakeEngine, pool: SlotPool, seed: int) -> None:
    sent = producer.call(op="pack", seed=seed)
    entries = [TensorEntry.model_validate(e) for e in sent["entries"]]
    slot = pool.acquire(timeout=1)
    assert slot is not None
    try:
        nbytes = pull_payload(engine, producer.endpoint, sent["slot_ptr"], entries, slot)
        assert nbytes >= payload_nbytes(entries)
        verify_checksum(slot.view(), entries, sent["checksum"])
        got = unpack_tensors(slot, entries)
    finally:
        # Release both sides even when the pull fails, as an acknowledgement or a lease expiry would.
        pool.release(slot.index)
        assert producer.call(op="release", slot_index=sent["slot_index"])["free"] == 2
    expected = make_payload(seed)
    assert list(got) == list(expected)
    for name, tensor in got.items():
        assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape
        assert bytes_digest(tensor) == sent["digests"][name] == bytes_digest(expected[name])


# -- two-process transfer ---------------------------------------------------------------


def test_payload_crosses_processes_bitwise(producer: Producer, consumer: tuple[MooncakeEngine, SlotPool]) -> None:
    engine, pool = consumer
    assert producer.endpoint != engine.endpoint
    pull_and_check(producer, engine, pool, seed=1)


def test_packed_payload_is_one_read_span(producer: Producer) -> None:
    sent = producer.call(op="pack", seed=2)
    producer.call(op="release", slot_index=sent["slot_index"])
    entries = [TensorEntry.model_validate(e) for e in sent["entries"]]
    assert all(e.offset % ALIGNMENT == 0 for e in entries)
    assert transfer_spans(entries) == [(0, payload_end(entries))]


def test_read_outside_registered_pool_is_refused(producer: Producer, consumer: tuple[MooncakeEngine, SlotPool]) -> None:
    engine, pool = consumer
    slot = pool.acquire(timeout=1)
    assert slot is not None
    try:
        with pytest.raises(TransferError, match="registered pool"):
            engine.read(producer.endpoint, slot.ptr, producer.base_ptr + producer.pool_bytes + 4096, 1024)
        # A range that starts inside the pool but runs past its end is refused too.
        with pytest.raises(TransferError):
            engine.read(producer.endpoint, slot.ptr, producer.base_ptr + producer.pool_bytes - 512, 1024)
    finally:
        pool.release(slot.index)
    # The refusal leaves both engines serving.
    pull_and_check(producer, engine, pool, seed=3)


def test_read_into_unregistered_local_memory_is_refused(
    producer: Producer, consumer: tuple[MooncakeEngine, SlotPool]
) -> None:
    """Mooncake's TCP transport would write there; the wrapper must refuse before any byte moves."""
    engine, pool = consumer
    outside = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(TransferError, match="not inside memory registered"):
        engine.read(producer.endpoint, outside.data_ptr(), producer.base_ptr, 64)
    pool_end = pool.base_ptr + pool.num_slots * pool.slot_bytes
    with pytest.raises(TransferError, match="not inside memory registered"):
        # The first span is fine, the second runs 56 bytes past the end of the registered pool.
        engine.batch_read(producer.endpoint, [pool.base_ptr, pool_end - 8], [producer.base_ptr] * 2, [8, 64])
    assert not bool(outside.any())
    # pull_payload refuses at slot granularity, before asking the engine.
    slot = pool.acquire(timeout=1)
    assert slot is not None
    try:
        big = [TensorEntry(name="x", dtype="uint8", shape=(SLOT_BYTES + 1,), offset=0, nbytes=SLOT_BYTES + 1)]
        with pytest.raises(PayloadTooLarge):
            pull_payload(engine, producer.endpoint, producer.base_ptr, big, slot)
    finally:
        pool.release(slot.index)


def test_tcp_reads_land_in_an_open_private_destination_only(
    producer: Producer, consumer: tuple[MooncakeEngine, SlotPool]
) -> None:
    """The direct receive path: the engine self-tested it, and the wrapper bounds it to the open range."""
    engine, _ = consumer
    assert engine.reads_into_private_memory
    sent = producer.call(op="pack", seed=5)
    entries = [TensorEntry.model_validate(e) for e in sent["entries"]]
    try:
        landing = fresh_landing_buffer(payload_end(entries))
        # Not open yet: refused like any unregistered destination.
        with pytest.raises(TransferError, match="not inside memory registered"):
            pull_payload(engine, producer.endpoint, sent["slot_ptr"], entries, landing)
        with engine.private_destination(landing.ptr, landing.nbytes):
            with pytest.raises(TransferError, match="not inside memory registered"):
                engine.read(producer.endpoint, landing.ptr + landing.nbytes - 8, sent["slot_ptr"], 64)
            pull_payload(engine, producer.endpoint, sent["slot_ptr"], entries, landing)
        got = views_verified(landing, entries, sent["checksum"])
    finally:
        producer.call(op="release", slot_index=sent["slot_index"])
    for name, tensor in make_payload(5).items():
        assert bytes_digest(got[name]) == bytes_digest(tensor)
        # Views of the landing buffer, not copies: the read is the only pass over the bytes.
        assert landing.ptr <= got[name].data_ptr() < landing.ptr + landing.nbytes
    # Closed again: the same range is refused.
    with pytest.raises(TransferError, match="not inside memory registered"):
        engine.read(producer.endpoint, landing.ptr, sent["slot_ptr"], 64)
    landing.view()[entries[0].offset + 3] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        views_verified(landing, entries, sent["checksum"])


def test_private_destinations_can_be_turned_off() -> None:
    with MooncakeEngine(private_destinations=False) as engine:
        assert not engine.reads_into_private_memory
        buffer = torch.zeros(64, dtype=torch.uint8)
        with pytest.raises(TransferError, match="registered receive slot"):
            with engine.private_destination(buffer.data_ptr(), 64):
                pass


def test_read_after_idle_gap_succeeds(producer: Producer, consumer: tuple[MooncakeEngine, SlotPool]) -> None:
    engine, pool = consumer
    pull_and_check(producer, engine, pool, seed=4)
    time.sleep(4)
    pull_and_check(producer, engine, pool, seed=5)


def _drop_connections_to(pid: int) -> int:
    """Kill established TCP connections to ``pid``'s listening ports, as a reaped idle connection would be."""
    if shutil.which("ss") is None:
        return 0
    listening = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=False).stdout
    ports = {line.split()[3].rsplit(":", 1)[1] for line in listening.splitlines() if f"pid={pid}," in line}
    killed = 0
    for port in ports:
        out = subprocess.run(
            ["ss", "-K", "-tnH", "state", "established", "dst", "127.0.0.1", "dport", "=", f":{port}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        killed += len(out.splitlines())
    return killed


def test_read_over_a_dropped_idle_connection_is_retried(
    producer: Producer, consumer: tuple[MooncakeEngine, SlotPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real mechanism behind Mooncake#4209: a pooled connection closed while idle fails the next read once."""
    engine, pool = consumer
    pull_and_check(producer, engine, pool, seed=10)  # the consumer now holds idle connections to the producer
    if _drop_connections_to(producer.proc.pid) == 0:
        pytest.skip("cannot drop sockets here (ss -K needs iproute2, CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)")
    with monkeypatch.context() as once:
        once.setattr(engine, "_read_attempts", 1)
        with pytest.raises(TransferError):
            pull_and_check(producer, engine, pool, seed=11)
    pull_and_check(producer, engine, pool, seed=12)
    assert _drop_connections_to(producer.proc.pid) > 0
    pull_and_check(producer, engine, pool, seed=13)  # fails once inside, succeeds on the retry


def _wait_until_stopped(pid: int) -> None:
    """SIGSTOP is delivered asynchronously: wait until the kernel reports the process stopped (state T)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def test_wedged_producer_times_out_once_and_dead_producer_fails_fast(
    consumer: tuple[MooncakeEngine, SlotPool],
) -> None:
    """A stopped producer costs one transfer timeout (not one per attempt); a dead one fails in about a second."""
    own = Producer()
    engine = MooncakeEngine(transfer_timeout_s=5)
    pool = SlotPool(engine, SLOT_BYTES, num_slots=2)
    try:
        assert engine.transfer_timeout_s == 5 and consumer[0].transfer_timeout_s == 30
        pull_and_check(own, engine, pool, seed=20)
        sent = own.call(op="pack", seed=21)
        entries = [TensorEntry.model_validate(e) for e in sent["entries"]]
        slot = pool.acquire(timeout=1)
        assert slot is not None
        own.proc.send_signal(signal.SIGSTOP)
        _wait_until_stopped(own.proc.pid)
        try:
            started = time.monotonic()
            with pytest.raises(TransferError, match="timed out"):
                pull_payload(engine, own.endpoint, sent["slot_ptr"], entries, slot)
            # Under 10 s: three attempts would cost 15 s, so the timed-out read was not retried.
            assert 5 <= time.monotonic() - started < 9.5
        finally:
            own.proc.send_signal(signal.SIGCONT)
        pull_payload(engine, own.endpoint, sent["slot_ptr"], entries, slot)  # the engine recovers
        verify_checksum(slot.view(), entries, sent["checksum"])
        own.proc.kill()
        own.proc.wait()
        started = time.monotonic()
        with pytest.raises(TransferError, match="alive"):
            pull_payload(engine, own.endpoint, sent["slot_ptr"], entries, slot)
        # Well under the 5 s transfer timeout: a dead peer is noticed, not waited out.
        assert time.monotonic() - started < 4.5
        pool.release(slot.index)
    finally:
        own.stop()
        pool.close()
        engine.close()


class _FailsFirstRead:
    """Wraps the real engine; the first read fails fast the way Mooncake#4209's idle-gap reads do."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls = 0

    def batch_transfer_sync_read(self, *args: Any) -> int:
        self.calls += 1
        return -1 if self.calls == 1 else int(self._inner.batch_transfer_sync_read(*args))


def test_fast_read_failure_is_retried(
    producer: Producer, consumer: tuple[MooncakeEngine, SlotPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, pool = consumer
    flaky = _FailsFirstRead(engine._engine)
    monkeypatch.setattr(engine, "_engine", flaky)
    pull_and_check(producer, engine, pool, seed=6)
    assert flaky.calls == 2


def test_missing_mooncake_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(TransferError, match="pip install mooncake-transfer-engine"):
        MooncakeEngine()


# -- the slot pool ----------------------------------------------------------------------


def test_pool_blocks_at_capacity_and_wakes_on_release(
    consumer: tuple[MooncakeEngine, SlotPool], caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = consumer
    with SlotPool(engine, 4096, num_slots=2) as pool:
        first, second = pool.acquire(timeout=0), pool.acquire(timeout=0)
        assert first is not None and second is not None
        assert {first.index, second.index} == {0, 1} and pool.free_count == 0
        assert second.ptr - pool.base_ptr == second.index * 4096 and second.view().numel() == 4096
        started = time.monotonic()
        assert pool.acquire(timeout=0.2) is None
        assert time.monotonic() - started >= 0.2

        got = returned_after(lambda: pool.acquire(timeout=5), lambda: pool.release(first.index))
        assert got and got[0] is not None and got[0].index == first.index

        pool.release(second.index)
        with caplog.at_level(logging.WARNING):
            pool.release(second.index)  # a repeated ack is a no-op
        assert "already free" in caplog.text
        assert pool.free_count == 1
        with pytest.raises(ValueError):
            pool.release(7)


def returned_after(blocking_call: Any, release: Any) -> list[Any]:
    """Run ``blocking_call`` in a thread, check it is still blocked, ``release``, and return what it returned."""
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(blocking_call()))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still blocked
    release()
    waiter.join(5)
    return got


def test_waiting_for_a_free_slot_wakes_on_release_and_takes_nothing(consumer: tuple[MooncakeEngine, SlotPool]) -> None:
    engine, _ = consumer
    with SlotPool(engine, 4096, num_slots=1) as pool:
        assert pool.wait_for_free(timeout=0)
        slot = pool.acquire(timeout=0)
        assert slot is not None
        started = time.monotonic()
        assert not pool.wait_for_free(timeout=0.2)
        assert time.monotonic() - started >= 0.2

        woke = returned_after(lambda: pool.wait_for_free(timeout=5), lambda: pool.release(slot.index))
        assert woke == [True] and pool.free_count == 1


def test_slots_are_disjoint_views_of_one_buffer(consumer: tuple[MooncakeEngine, SlotPool]) -> None:
    engine, _ = consumer
    with SlotPool(engine, 1024, num_slots=3) as pool:
        slots = [pool.acquire(timeout=0) for _ in range(3)]
        for i, slot in enumerate(slots):
            assert slot is not None
            slot.view().fill_(i)
        for i, slot in enumerate(slots):
            assert slot is not None and bool((slot.view() == i).all())
            assert slot.view().data_ptr() == slot.ptr


# -- packing ----------------------------------------------------------------------------


def test_pack_refuses_a_payload_that_does_not_fit() -> None:
    buf = ByteBuffer(8192)
    with pytest.raises(PayloadTooLarge, match="slot_mb"):
        pack_tensors({"a": torch.ones(1024), "b": torch.ones(2048)}, buf)
    assert int(buf.view().sum()) == 0  # nothing was written


def test_checksum_covers_exactly_the_tensor_bytes() -> None:
    buf = ByteBuffer(SLOT_BYTES)
    entries, checksum = pack_tensors({"mask": torch.ones(3, dtype=torch.bool), **make_payload(7)}, buf)
    verify_checksum(buf.view(), entries, checksum)
    # Padding after the first tensor is not payload: changing it must not matter.
    first_end = entries[0].offset + entries[0].nbytes
    assert entries[1].offset > first_end
    buf.view()[first_end] ^= 0xFF
    verify_checksum(buf.view(), entries, checksum)
    # One flipped byte in a tensor must.
    buf.view()[entries[2].offset + 123] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        verify_checksum(buf.view(), entries, checksum)
    assert payload_checksum(buf.view(), entries) != checksum


def test_unpacked_tensors_own_their_memory() -> None:
    buf = ByteBuffer(SLOT_BYTES)
    tensors = make_payload(8)
    entries, _ = pack_tensors(tensors, buf)
    got = unpack_tensors(buf, entries)
    buf.view().fill_(0)  # the slot goes back to the pool and is reused
    for name, tensor in got.items():
        assert tensor.dtype == tensors[name].dtype
        assert torch.equal(tensor, tensors[name])


def test_multi_chunk_payloads_copy_and_hash_like_a_plain_pass() -> None:
    """Pack and unpack hash in COPY_HASH_CHUNK pieces; the result must equal one plain hash of the slot."""
    generator = torch.Generator().manual_seed(11)
    tensors = {
        "latents": torch.randn(3 * COPY_HASH_CHUNK // 4 + 5, generator=generator),  # 3 chunks and a ragged tail
        "text": torch.randn(2, 1000, dtype=torch.bfloat16, generator=generator),
    }
    buf = ByteBuffer(4 * COPY_HASH_CHUNK)
    entries, checksum = pack_tensors(tensors, buf)
    assert checksum == payload_checksum(buf.view(), entries)
    got = unpack_verified(buf, entries, checksum)
    buf.view().fill_(0)  # the receive slot is reused at once: the tensors must not live in it
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and bytes_digest(got[name]) == bytes_digest(tensor)


def test_unpack_verified_refuses_a_corrupt_byte_in_any_chunk() -> None:
    tensors = {"latents": torch.arange(COPY_HASH_CHUNK, dtype=torch.float32)}  # 4 chunks
    buf = ByteBuffer(4 * COPY_HASH_CHUNK)
    entries, checksum = pack_tensors(tensors, buf)
    for position in (0, COPY_HASH_CHUNK + 7, 4 * COPY_HASH_CHUNK - 1):
        buf.view()[position] ^= 0x10
        with pytest.raises(ChecksumMismatch, match="the descriptor says"):
            unpack_verified(buf, entries, checksum)
        buf.view()[position] ^= 0x10
    assert torch.equal(unpack_verified(buf, entries, checksum)["latents"], tensors["latents"])
    with pytest.raises(ChecksumMismatch, match="does not name its algorithm"):
        unpack_verified(buf, entries, checksum.partition(":")[2])


def test_blake2b_checksums_verify_too() -> None:
    buf = ByteBuffer(SLOT_BYTES)
    entries, _ = pack_tensors(make_payload(9), buf)
    checksum = payload_checksum(buf.view(), entries, "blake2b")
    assert checksum.startswith("blake2b:")
    verify_checksum(buf.view(), entries, checksum)


DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    count = draw(st.integers(1, 5))
    out: dict[str, torch.Tensor] = {}
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=4)))
        seed = draw(st.integers(0, 2**31 - 1))
        # Random bytes, not random values: every bit pattern (NaNs included) must survive.
        raw = torch.randint(
            0,
            256,
            (torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size(),),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(seed),
        )
        tensor = raw.view(torch.uint8 if dtype == torch.bool else dtype).reshape(shape)
        out[f"t{i}"] = (tensor & 1).bool() if dtype == torch.bool else tensor
    return out


@settings(max_examples=60, deadline=None)
@given(tensor_sets())
def test_pack_unpack_round_trips_bitwise(tensors: dict[str, torch.Tensor]) -> None:
    buf = ByteBuffer(64 * 1024)
    entries, checksum = pack_tensors(tensors, buf)
    verify_checksum(buf.view(), entries, checksum)
    for got in (unpack_tensors(buf, entries), unpack_verified(buf, entries, checksum)):
        assert list(got) == list(tensors)
        for name, tensor in tensors.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
            assert bytes_digest(got[name]) == bytes_digest(tensor)
    # A packed payload is read in at most one span, which covers every tensor byte.
    spans = transfer_spans(entries)
    assert len(spans) <= 1
    for entry in entries:
        if entry.nbytes:
            assert any(s <= entry.offset and entry.offset + entry.nbytes <= s + n for s, n in spans)


def test_transfer_spans_merge_only_near_neighbours() -> None:
    def entry(name: str, offset: int, nbytes: int) -> TensorEntry:
        return TensorEntry(name=name, dtype="uint8", shape=(nbytes,), offset=offset, nbytes=nbytes)

    entries = [
        entry("far", 10_000, 100),  # out of order on purpose
        entry("a", 0, 100),
        entry("b", 256, 300),  # 156 bytes of padding after a: merged
        entry("empty", 5_000, 0),  # no bytes, no span
        entry("c", 4096, 10),  # 3540 bytes after b: a new span
    ]
    assert transfer_spans(entries) == [(0, 556), (4096, 10), (10_000, 100)]
    assert payload_nbytes(entries) == 510 and payload_end(entries) == 10_100


if __name__ == "__main__" and sys.argv[1:] == ["producer"]:
    _producer_main()
