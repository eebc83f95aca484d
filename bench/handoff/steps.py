"""The measured steps: one payload through the three ways (farm, rq pickle, memcpy), in phases.

Also the farm hand-off step by step: `traced_steps` wraps every call the
product's own ``pull_input`` makes, so the breakdown cannot drift from the code.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from rq import Queue
from rq.job import Job

from bench.handoff.engines import PRODUCER_STAGE, Produced, ProducerProcess
from bench.handoff.payloads import make_payload, payload_bytes
from bench.handoff.stats import Laps
from scheduler.core import keys
from scheduler.core.rooms import Rooms
from workers.handoff import pull_input
from workers.runtime import StageRuntime
from workers.transfer import SlotPool, transfer_spans

# Larger than any last-level cache the bench is likely to run on: writing it evicts the payload.
CACHE_EVICT_BYTES = 256 * 2**20
RQ_QUEUE = "bench-handoff-pickle"
# rq stores the function by name and the bench never runs a worker, so the name only has to be importable.
RQ_JOB_TARGET = "bench.handoff.payloads.rq_job_target"


def raw_read(rt: StageRuntime, endpoint: str, produced: Produced) -> float:
    """Seconds for ``batch_read`` of the payload's spans into a receive slot, nothing else."""
    slot = rt.pool.acquire(timeout=5)
    assert slot is not None
    try:
        spans = transfer_spans(produced.entries)
        local = [slot.ptr + off for off, _ in spans]
        remote = [produced.slot_base + off for off, _ in spans]
        lengths = [n for _, n in spans]
        started = time.perf_counter()
        rt.engine.batch_read(endpoint, local, remote, lengths)
        return time.perf_counter() - started
    finally:
        rt.pool.release(slot.index)


PULL_STEP = "pull (batch_read)"


def _finish_room(rt: StageRuntime, job_id: str) -> None:
    """Claim and ack a room without pulling, so the producer frees the slot it holds (not timed)."""
    room_key = keys.room_key(job_id, PRODUCER_STAGE, 1)
    rooms = rt.rooms
    producer_id = rooms.read(room_key)["producer_id"]
    if not (
        rooms.claim(room_key, rt.worker_id, rt.settings.worker.worker_ttl_seconds)
        and rooms.mark_transferring(room_key, rt.worker_id)
        and rooms.ack(room_key, rt.worker_id, producer_id)
    ):
        raise RuntimeError(f"room {room_key} could not be finished")


def _rotated(items: Sequence[str], shift: int) -> list[str]:
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def traced_calls() -> list[tuple[Any, str, str, bool]]:
    """What ``pull_input`` calls, where it looks each one up, the step to report it under, and whether every
    hand-off makes it (the rest belong to one receive path: private memory or a registered slot)."""
    import workers.handoff as handoff

    return [
        (Rooms, "claim_and_read", "claim (returns the room)", True),
        (handoff, "verify_descriptor", "verify descriptor", True),
        (Rooms, "begin_transfer", "check producer + mark transferring", True),
        (handoff, "fresh_landing_buffer", "fresh private buffer (page faults)", False),
        (SlotPool, "acquire", "acquire slot", False),
        (handoff, "pull_payload", PULL_STEP, True),
        (handoff, "views_verified", "verify checksum", False),
        (handoff, "unpack_verified", "copy out + verify the copy", False),
        (SlotPool, "release", "release slot", False),
        (Rooms, "ack", "ack", True),
    ]


def _timed(function: Callable[..., Any], step: str, steps: dict[str, float], depth: list[int]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:  # a traced call made inside another one counts once, in the outer step
                steps[step] = steps.get(step, 0.0) + time.perf_counter() - started

    return timed


@contextlib.contextmanager
def traced_steps() -> Iterator[dict[str, float]]:
    """Time every call ``pull_input`` makes, by wrapping them where it looks them up, for one hand-off.

    The breakdown runs the product's own ``pull_input`` rather than a copy of its steps, so it cannot
    drift from the code; a step the product stops calling shows up as missing, new work as "other".
    """
    steps: dict[str, float] = {}
    depth = [0]
    saved: list[tuple[Any, str, Any]] = []
    try:
        for owner, attr, step, _ in traced_calls():
            if attr not in vars(owner):
                raise RuntimeError(f"{owner.__name__}.{attr} is gone: update bench.handoff.steps.traced_calls")
            original = vars(owner)[attr]
            setattr(owner, attr, _timed(original, step, steps, depth))
            saved.append((owner, attr, original))
        yield steps
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def pull_input_by_step(rt: StageRuntime, job_id: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``workers.handoff.pull_input`` with each of its calls timed; "other" is the glue between them."""
    with traced_steps() as steps:
        started = time.perf_counter()
        tensors = pull_input(rt, job_id, PRODUCER_STAGE, 1)
        total = time.perf_counter() - started
    missing = [step for _, _, step, always in traced_calls() if always and step not in steps]
    if missing:
        raise RuntimeError(f"pull_input no longer calls {', '.join(missing)}: update bench.handoff.steps.traced_calls")
    steps["other (glue)"] = max(total - sum(steps.values()), 0.0)
    return tensors, steps


def redis_once(conn: redis.Redis, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Enqueue the tensors as an rq job argument (default pickle serializer), fetch and unpickle them."""
    queue = Queue(RQ_QUEUE, connection=conn)
    laps = Laps()
    job = queue.enqueue(RQ_JOB_TARGET, tensors)
    laps.lap("enqueue (pickle+zlib+write)")
    fetched = Job.fetch(job.id, connection=conn)
    laps.lap("fetch (read+unzip)")
    received: dict[str, torch.Tensor] = fetched.args[0]
    laps.lap("deserialise (unpickle)")
    # Not timed: keep Valkey's memory flat across repeats.
    fetched.delete()
    return received, laps.steps


def redis_bytes_once(conn: redis.Redis, src: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Informational: the payload's raw bytes through one Redis SET and GET (no rq, no pickle, no zlib)."""
    key = keys.PREFIX + ":bench:handoff-bytes"
    started = time.perf_counter()
    conn.set(key, src.numpy().tobytes())
    got: bytes = conn.get(key)  # type: ignore[assignment]
    received = torch.frombuffer(bytearray(got), dtype=torch.uint8)
    elapsed = time.perf_counter() - started
    conn.delete(key)
    return received, elapsed


def memcpy_once(dst: torch.Tensor, src: torch.Tensor) -> float:
    started = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - started


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    if got.keys() != want.keys() or not all(
        got[k].dtype == w.dtype and got[k].shape == w.shape and torch.equal(got[k], w) for k, w in want.items()
    ):
        raise RuntimeError(f"{what}: the received tensors differ from the ones sent")


@dataclass
class PayloadSamples:
    name: str
    nbytes: int
    farm: list[float] = field(default_factory=list)
    farm_pack: list[float] = field(default_factory=list)
    pack: list[float] = field(default_factory=list)
    raw_read: list[float] = field(default_factory=list)
    redis: list[float] = field(default_factory=list)
    redis_bytes: list[float] = field(default_factory=list)
    memcpy: list[float] = field(default_factory=list)
    # Per stepped hand-off: all its steps but the batch read, i.e. the farm's cost beyond the raw read.
    paired_overhead: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=dict)
    redis_steps: dict[str, list[float]] = field(default_factory=dict)

    def add_steps(self, bucket: dict[str, list[float]], laps: dict[str, float]) -> None:
        for name, seconds in laps.items():
            bucket.setdefault(name, []).append(seconds)


def _settle(conn: redis.Redis, timeout: float = 30.0) -> None:
    """Wait until Valkey has no AOF rewrite or save running, so its child does not steal a core from the next phase."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = conn.info("persistence")  # type: ignore[assignment]
        if not info.get("aof_rewrite_in_progress") and not info.get("rdb_bgsave_in_progress"):
            break
        time.sleep(0.05)
    gc.collect()


def bench_payload(
    name: str,
    rt: StageRuntime,
    producer: ProducerProcess,
    conn: redis.Redis,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None],
) -> PayloadSamples:
    """One payload, in phases: farm (with its raw read and step breakdown), memcpy, then the rq path.

    The rq path runs last because it leaves Valkey busy (AOF writes and rewrites of tens of MB)
    and would otherwise steal CPU from the farm's next hand-off on a small machine.
    """
    tensors = make_payload(name)
    nbytes = payload_bytes(tensors)
    samples = PayloadSamples(name=name, nbytes=nbytes)

    # 1. Three hand-offs per repeat, each with its own freshly published room, in an order that rotates so
    #    none always runs first: the farm hand-off exactly as a worker runs it (pull_input), the raw read of
    #    the same spans alone, and the farm hand-off step by step for the breakdown.
    _settle(conn)
    for i in range(-warmup, repeats):
        results: dict[str, Any] = {}
        for way in _rotated(("farm", "raw", "steps"), i):
            job_id = f"bench-{name}-{i + warmup}-{way}"
            produced = producer.produce(name, job_id)
            if way == "farm":
                started = time.perf_counter()
                received = pull_input(rt, job_id, PRODUCER_STAGE, 1)
                results["consume_s"] = time.perf_counter() - started
                results["farm"] = produced
                if i == -warmup:
                    _same(received, tensors, "farm hand-off")
                del received
            elif way == "raw":
                results["raw_s"] = raw_read(rt, producer.endpoint, produced)
                _finish_room(rt, job_id)
            else:
                received, laps = pull_input_by_step(rt, job_id)
                results["laps"] = {"publish (producer)": produced.publish_s, **laps}
                del received
        if i < 0:
            continue
        farm: Produced = results["farm"]
        farm_s = farm.publish_s + results["consume_s"]
        laps = results["laps"]
        samples.farm.append(farm_s)
        samples.farm_pack.append(farm.pack_s + farm_s)
        samples.pack.append(farm.pack_s)
        samples.raw_read.append(results["raw_s"])
        samples.paired_overhead.append(sum(laps.values()) - laps[PULL_STEP])
        samples.add_steps(samples.steps, laps)
        progress(
            f"  {name} farm {i + 1}/{repeats}: {farm_s * 1e3:.1f} ms, raw read {results['raw_s'] * 1e3:.1f} ms, "
            f"overhead beyond its own read {samples.paired_overhead[-1] * 1e3:.2f} ms"
        )

    # 2. memcpy of the same bytes between preallocated buffers, from memory rather than the last-level
    #    cache: a hand-off's bytes were not just touched by the consumer, and back-to-back copies of a
    #    payload that fits the L3 would measure the cache instead.
    src = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors.values()])
    dst = torch.zeros_like(src)
    scratch = torch.zeros(CACHE_EVICT_BYTES, dtype=torch.uint8)
    for i in range(-warmup, repeats):
        scratch.add_(1)
        memcpy_s = memcpy_once(dst, src)
        if i >= 0:
            samples.memcpy.append(memcpy_s)
    del dst, scratch

    # 3. The rq pickle path, and (informational) the same bytes through a plain Redis SET/GET.
    for i in range(-warmup, repeats):
        gc.collect()
        received, redis_laps = redis_once(conn, tensors)
        if i == -warmup:
            _same(received, tensors, "rq pickle path")
        del received
        if i < 0:
            continue
        samples.redis.append(sum(redis_laps.values()))
        samples.add_steps(samples.redis_steps, redis_laps)
        progress(f"  {name} redis {i + 1}/{repeats}: {samples.redis[-1] * 1e3:.1f} ms")
    for i in range(-warmup, repeats):
        got, seconds = redis_bytes_once(conn, src)
        if i == -warmup and not torch.equal(got, src):
            raise RuntimeError("redis SET/GET: the received bytes differ from the ones sent")
        del got
        if i >= 0:
            samples.redis_bytes.append(seconds)
    del src
    _settle(conn)
    return samples
