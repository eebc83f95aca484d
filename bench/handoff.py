"""The stage hand-off, measured against its baselines on production-size payloads.

Run: ``python -m bench.handoff [--quick] [--repeats N] [--payloads text,480p,720p] [--receive auto|slot] [--json PATH]``.

The same tensors move from one process to another three ways, in one run:

1. **farm** -- what the stage workers run. The producer is a separate process
   with a real ``StageRuntime``: its own ``MooncakeEngine`` and ``SlotPool``
   (registered once), a registered live worker with its heartbeat and its ack
   listener. It packs the tensors into a slot (``workers.handoff.stage_output``)
   and publishes the signed room (``Rooms.publish``). The consumer is this
   process with its own engine and pool; it runs ``workers.handoff.pull_input``:
   claim (which returns the room), verify the descriptor (signature, lease,
   bounds), check the producer is live at its registered endpoint and mark
   TRANSFERRING (one step), batch-read, copy out and verify the copies, ack.

   - ``farm``      = publish + pull_input (the issue's "publish + claim + pull + verify + ack")
   - ``farm+pack`` = farm + the producer's pack (copy into the slot, checksum, sign):
     the counterpart of the pickling that the Redis path's enqueue does
   - ``raw read``  = ``MooncakeEngine.batch_read`` of the same spans, alone
   - steps         = one more hand-off per repeat runs the product's own pull_input
     with every call it makes wrapped in a timer (``traced_steps``), to show where
     the time goes; "other" is the Python between those calls
   - overhead      = per step-by-step hand-off, all its steps but its own batch_read
     (median, in ms): the farm's cost beyond the raw read. The unpaired
     median(farm) - median(raw read) is reported beside it; it carries the
     transport's jitter, which on a small VM is larger than the 5 ms target.

2. **redis** -- what rq users do by default: the tensors as an rq job argument
   (rq's default pickle serializer; rq also zlib-compresses the job data),
   ``Queue.enqueue``; the consumer ``Job.fetch`` + ``job.args``.

3. **memcpy** -- ``dst.copy_(src)`` of the same bytes between preallocated uint8
   tensors in this process (caches evicted first): the local limit.

Informational, not a target: **redis SET/GET bytes** -- the payload's raw bytes
through one ``SET`` and one ``GET`` (no rq, no pickle, no zlib), to show how much
of the rq path's cost is rq's own serialisation rather than Redis.

Every farm measurement gets a freshly published room; the order farm / raw read /
steps rotates per repeat; the rq path runs after the farm phase (it leaves Valkey
busy writing AOF). Both processes run torch with one intra-op thread, like the
embedded farm's workers (``OMP_NUM_THREADS`` overrides). The CPU that other
processes used meanwhile is reported per payload: the figures mean little on a
busy machine.

The bench starts its own Valkey (``start_valkey`` in a temporary folder) and the
producer process, and stops both on the way out, Ctrl-C, SIGTERM and errors included.
The producer talks JSON lines over its stdin/stdout; the Redis URL and farm
secret travel on that pipe, never on a command line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis
import torch
from rq import Queue
from rq.job import Job

from scheduler import keys
from scheduler.connection import connect_redis
from scheduler.descriptors import TensorEntry
from scheduler.keys import Stage
from scheduler.local_servers import ManagedServer, start_valkey
from scheduler.rooms import Rooms
from scheduler.settings import FarmSettings, TransferSettings
from workers.handoff import pull_input, stage_output
from workers.runtime import StageRuntime, make_worker_id, transfer_engine
from workers.transfer import SlotPool, transfer_spans

REPO = Path(__file__).resolve().parents[1]

# The producer and consumer stages of the bench's hand-off: the verification pull_input does depends
# on the producer being a live worker of the upstream stage, not on which stages they are.
PRODUCER_STAGE = Stage.ENCODE
CONSUMER_STAGE = Stage.TRANSFORM

TARGET_REDIS_OVER_FARM = 5.0  # at 720p, on loopback
TARGET_OVERHEAD_MS = 5.0  # farm beyond the raw Mooncake read, per hand-off
TARGET_PAYLOAD = "720p"

REPLY_TIMEOUT_S = 120.0
SLOT_MB = 32  # the 720p latents are 18.5 MiB
# Larger than any last-level cache the bench is likely to run on: writing it evicts the payload.
CACHE_EVICT_BYTES = 256 * 2**20
RQ_QUEUE = "bench-handoff-pickle"
# rq stores the function by name and the bench never runs a worker, so the name only has to be importable.
RQ_JOB_TARGET = "bench.handoff.rq_job_target"


# --------------------------------------------------------------------------- payloads


def _text_embeds(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # umT5-XXL output for a prompt and the negative prompt (CFG): 2 x [1, 512, 4096] bfloat16.
    return {
        "prompt_embeds": torch.randn(1, 512, 4096, generator=gen).to(torch.bfloat16),
        "negative_prompt_embeds": torch.randn(1, 512, 4096, generator=gen).to(torch.bfloat16),
    }


def _latents_480p(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # 81 frames at 832x480 -> 21 latent frames of 104x60, 16 channels.
    return {"latents": torch.randn(1, 16, 21, 60, 104, generator=gen)}


def _latents_720p(gen: torch.Generator) -> dict[str, torch.Tensor]:
    # 81 frames at 1280x720 -> 21 latent frames of 160x90, 16 channels.
    return {"latents": torch.randn(1, 16, 21, 90, 160, generator=gen)}


PAYLOADS: dict[str, Callable[[torch.Generator], dict[str, torch.Tensor]]] = {
    "text": _text_embeds,
    "480p": _latents_480p,
    "720p": _latents_720p,
}
PAYLOAD_LABELS = {
    "text": "text embeddings 2x[1,512,4096] bf16",
    "480p": "latents 480p [1,16,21,60,104] f32",
    "720p": "latents 720p [1,16,21,90,160] f32",
}


def make_payload(name: str) -> dict[str, torch.Tensor]:
    """The payload's tensors, the same in every process (seeded)."""
    return PAYLOADS[name](torch.Generator().manual_seed(1234))


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rq_job_target(tensors: dict[str, torch.Tensor]) -> int:
    """What an rq worker would run with the tensors (the bench only enqueues and fetches)."""
    return payload_bytes(tensors)


# --------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); q in [0, 100]."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[float], nbytes: int) -> dict[str, float]:
    median = percentile(samples, 50)
    return {
        "median_s": median,
        "p95_s": percentile(samples, 95),
        "min_s": min(samples),
        "bytes_per_s": nbytes / median if median > 0 else math.inf,
        "n": len(samples),
    }


class Laps:
    """Named durations of consecutive steps, from one perf_counter clock."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + (now - self._last)
        self._last = now


class CpuWatch:
    """CPU time the rest of the machine used while the bench ran: the figures only mean much on a quiet machine.

    Other = every core's busy time (/proc/stat) minus what the bench's own processes used (the bench,
    its producer, its Valkey), in cores averaged over the interval. Linux only; None elsewhere.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = self._sample()

    @staticmethod
    def _busy_ticks() -> int:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        return sum(values) - values[3] - values[4]

    def _own_ticks(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += int(fields[11]) + int(fields[12])  # utime stime
        return total

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            return time.monotonic(), self._busy_ticks(), self._own_ticks()
        except (OSError, ValueError, IndexError):
            return None

    def other_cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(other, 0) / hz / (end[0] - self._start[0])


BUSY_MACHINE_CORES = 0.25


# --------------------------------------------------------------------------- the producer process


def _settings(redis_url: str, secret: str, direct_receive: bool = True) -> FarmSettings:
    # Slots sized for the largest bench payload, not from model configs (the bench loads no model).
    transfer = TransferSettings(slot_mb=SLOT_MB, direct_receive=direct_receive)
    return FarmSettings(redis_url=redis_url, secret=secret, transfer=transfer)


def _runtime(stage: Stage, settings: FarmSettings) -> StageRuntime:
    """The parts of ``start_runtime`` a hand-off uses (no model: the payload is made up)."""
    conn = connect_redis(settings)
    engine = transfer_engine(settings, log_level="ERROR")
    try:
        pool = SlotPool(
            engine, slot_bytes=(settings.transfer.slot_mb or SLOT_MB) * 2**20, num_slots=settings.transfer.slots
        )
    except BaseException:
        engine.close()
        raise
    return StageRuntime(
        stage=stage,
        settings=settings,
        conn=conn,
        computes={},
        tasks={},
        engine=engine,
        pool=pool,
        worker_id=make_worker_id(stage),
        secret=settings.require_secret(),
    )


def _close_runtime(rt: StageRuntime) -> None:
    try:
        rt.close()
    finally:
        rt.pool.close()
        rt.conn.close()


def producer_main() -> int:
    """The producing worker: answers one JSON request per line on stdin, one reply per line."""
    # The protocol owns the real stdout; anything else (a C library's printf) goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process stops

    def reply(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    hello = json.loads(sys.stdin.readline() or "{}")
    rt = _runtime(PRODUCER_STAGE, _settings(hello["redis_url"], hello["secret"]))
    try:
        # A live registered worker with heartbeat and ack listener, as a consumer's verification requires.
        rt.register()
        reply({"endpoint": rt.engine.endpoint, "worker_id": rt.worker_id})
        payloads: dict[str, dict[str, torch.Tensor]] = {}
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] != "produce":
                break
            tensors = payloads.setdefault(request["payload"], make_payload(request["payload"]))
            started = time.perf_counter()
            desc, signature = stage_output(rt, request["job_id"], 1, tensors)
            packed = time.perf_counter()
            rt.rooms.publish(desc, signature)
            published = time.perf_counter()
            reply(
                {
                    "pack_s": packed - started,
                    "publish_s": published - packed,
                    "slot_base": desc.slot_base,
                    "entries": [e.model_dump(mode="json") for e in desc.tensors],
                }
            )
    finally:
        _close_runtime(rt)
    return 0


@dataclass
class Produced:
    pack_s: float
    publish_s: float
    slot_base: int
    entries: list[TensorEntry]


class ProducerProcess:
    """The producer child: started in its own session so a Ctrl-C reaches only the bench, which stops it."""

    def __init__(self, redis_url: str, secret: str) -> None:
        env = dict(os.environ, MC_LOG_LEVEL="ERROR", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch_threads()))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.handoff", "--producer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        try:
            self._send({"redis_url": redis_url, "secret": secret})
            hello = self._recv()
        except BaseException:
            self.stop()
            raise
        self.endpoint: str = hello["endpoint"]
        self.worker_id: str = hello["worker_id"]

    def produce(self, payload: str, job_id: str) -> Produced:
        self._send({"op": "produce", "payload": payload, "job_id": job_id})
        got = self._recv()
        return Produced(
            pack_s=got["pack_s"],
            publish_s=got["publish_s"],
            slot_base=got["slot_base"],
            entries=[TensorEntry.model_validate(e) for e in got["entries"]],
        )

    def stop(self) -> None:
        """Ask it to finish (it closes its engine and deregisters), then insist. Idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._send({"op": "quit"})
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def _recv(self) -> dict[str, Any]:
        out: IO[bytes] | None = self.proc.stdout
        assert out is not None
        # One request is outstanding at a time, so a readable pipe holds exactly one whole line.
        ready, _, _ = select.select([out], [], [], REPLY_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"the producer process did not answer within {REPLY_TIMEOUT_S:.0f}s")
        line = out.readline()
        if not line:
            raise RuntimeError(f"the producer process exited (status {self.proc.wait()}); see its stderr above")
        reply: dict[str, Any] = json.loads(line)
        return reply


# --------------------------------------------------------------------------- the three ways


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
RECEIVE_PRIVATE = "private memory (read lands in the stage's tensors; no receive slot, no copy)"
RECEIVE_SLOT = "a registered receive slot, copied out (the RDMA path)"


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


def _traced_calls() -> list[tuple[Any, str, str, bool]]:
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
        for owner, attr, step, _ in _traced_calls():
            if attr not in vars(owner):
                raise RuntimeError(f"{owner.__name__}.{attr} is gone: update bench.handoff._traced_calls")
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
    missing = [step for _, _, step, always in _traced_calls() if always and step not in steps]
    if missing:
        raise RuntimeError(f"pull_input no longer calls {', '.join(missing)}: update bench.handoff._traced_calls")
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


# --------------------------------------------------------------------------- one payload


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


# --------------------------------------------------------------------------- report


def payload_report(s: PayloadSamples) -> dict[str, Any]:
    ways = {
        "farm": summarize(s.farm, s.nbytes),
        "farm_plus_pack": summarize(s.farm_pack, s.nbytes),
        "raw_read": summarize(s.raw_read, s.nbytes),
        "redis": summarize(s.redis, s.nbytes),
        "redis_bytes": summarize(s.redis_bytes, s.nbytes),
        "memcpy": summarize(s.memcpy, s.nbytes),
    }
    farm, raw, red, mem = (ways[k]["median_s"] for k in ("farm", "raw_read", "redis", "memcpy"))
    overhead_ms = percentile(s.paired_overhead, 50) * 1e3
    ratios = {
        "redis_over_farm": red / farm,
        "redis_over_farm_plus_pack": red / ways["farm_plus_pack"]["median_s"],
        "redis_bytes_over_farm": ways["redis_bytes"]["median_s"] / farm,
        "farm_over_memcpy": farm / mem,
        "farm_over_raw_read": farm / raw,
        "farm_overhead_ms": overhead_ms,
        "farm_overhead_p95_ms": percentile(s.paired_overhead, 95) * 1e3,
        "farm_minus_raw_read_ms": (farm - raw) * 1e3,
        "raw_read_jitter_ms": (ways["raw_read"]["p95_s"] - raw) * 1e3,
    }
    targets: dict[str, Any] = {
        "overhead_under_ms": TARGET_OVERHEAD_MS,
        "overhead_met": overhead_ms < TARGET_OVERHEAD_MS,
    }
    if s.name == TARGET_PAYLOAD:
        targets["redis_over_farm_at_least"] = TARGET_REDIS_OVER_FARM
        targets["redis_over_farm_met"] = ratios["redis_over_farm"] >= TARGET_REDIS_OVER_FARM
    return {
        "label": PAYLOAD_LABELS[s.name],
        "bytes": s.nbytes,
        "repeats": len(s.farm),
        "ways": ways,
        "ratios": ratios,
        "targets": targets,
        "farm_steps_median_s": {k: percentile(v, 50) for k, v in s.steps.items()},
        "farm_steps_p95_s": {k: percentile(v, 95) for k, v in s.steps.items()},
        "producer_pack_median_s": percentile(s.pack, 50),
        "redis_steps_median_s": {k: percentile(v, 50) for k, v in s.redis_steps.items()},
    }


def _versions(valkey_info: dict[str, Any]) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("mooncake-transfer-engine-non-cuda", "rq", "redis", "xxhash"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["valkey"] = str(valkey_info.get("valkey_version") or valkey_info.get("redis_version", "?"))
    return out


def _fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s < 1e12 else "inf"


def render_table(report: dict[str, Any]) -> str:
    lines = [
        f"reelfarm hand-off benchmark  {report['date']}",
        f"machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}; transport: Mooncake TCP on loopback; "
        f"torch threads per process: {report['machine']['torch_threads_per_process']}",
        f"command: {report['command']}",
        f"consumer receives into: {report['receive']}",
        f"repeats: {report['repeats']} (+{report['warmup']} warm-up) per payload",
        "",
    ]
    names = {
        "farm": "farm (publish..ack)",
        "farm_plus_pack": "farm + producer pack",
        "raw_read": "raw Mooncake read",
        "redis": "redis/rq pickle",
        "redis_bytes": "redis SET/GET bytes *",
        "memcpy": "in-process memcpy",
    }
    for key, p in report["payloads"].items():
        other = p["other_processes_cores"]
        load = "" if other is None else f"; other processes used {other:.2f} cores meanwhile"
        lines.append(f"== {key}: {p['label']}, {p['bytes'] / 2**20:.1f} MiB{load}")
        if other is not None and other > BUSY_MACHINE_CORES:
            lines.append(
                f"   WARNING: other processes used {other:.2f} cores during this payload; its figures are noisy"
            )
        lines.append(f"   {'way':<22} {'median ms':>10} {'p95 ms':>10} {'throughput':>12}")
        for way, label in names.items():
            w = p["ways"][way]
            lines.append(
                f"   {label:<22} {w['median_s'] * 1e3:>10.2f} {w['p95_s'] * 1e3:>10.2f} {_fmt_rate(w['bytes_per_s']):>12}"
            )
        r, t = p["ratios"], p["targets"]
        lines.append(
            f"   redis/farm {r['redis_over_farm']:.1f}x (redis/(farm+pack) {r['redis_over_farm_plus_pack']:.1f}x)   "
            f"farm/memcpy {r['farm_over_memcpy']:.1f}x   farm/raw read {r['farm_over_raw_read']:.2f}x   "
            f"(* redis SET/GET/farm {r['redis_bytes_over_farm']:.1f}x)"
        )
        lines.append(
            f"   farm overhead beyond the raw read: {r['farm_overhead_ms']:.2f} ms median, "
            f"{r['farm_overhead_p95_ms']:.2f} ms p95 (per hand-off: all steps but its own batch_read); "
            f"median(farm) - median(raw read) = {r['farm_minus_raw_read_ms']:.2f} ms "
            f"(raw read jitter p95-median {r['raw_read_jitter_ms']:.1f} ms)"
        )
        verdicts = [
            f"overhead < {t['overhead_under_ms']:.0f} ms: {'MET' if t['overhead_met'] else 'MISSED'}"
            f" ({r['farm_overhead_ms']:.2f} ms)"
        ]
        if "redis_over_farm_met" in t:
            verdicts.insert(
                0,
                f"redis/farm >= {t['redis_over_farm_at_least']:.0f}x: "
                f"{'MET' if t['redis_over_farm_met'] else 'MISSED'} ({r['redis_over_farm']:.1f}x)",
            )
        lines.append("   target " + "; ".join(verdicts))
        lines.append("   farm steps (median ms, the step-by-step hand-off):")
        steps = p["farm_steps_median_s"]
        lines.append("     " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in steps.items()))
        lines.append(f"     sum {sum(steps.values()) * 1e3:.2f}; producer pack {p['producer_pack_median_s'] * 1e3:.2f}")
        lines.append(
            "   redis steps (median ms): "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in p["redis_steps_median_s"].items())
        )
        lines.append("")
    if report["busy_payloads"]:
        lines.append(
            "machine was busy during: " + ", ".join(report["busy_payloads"]) + " -- rerun on a quiet machine to compare"
        )
    missed = report["targets_missed"]
    lines.append("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return "\n".join(lines)


def targets_missed(payloads: dict[str, Any]) -> list[str]:
    missed = []
    for name, p in payloads.items():
        t, r = p["targets"], p["ratios"]
        if not t["overhead_met"]:
            missed.append(f"{name} farm overhead {r['farm_overhead_ms']:.2f} ms >= {TARGET_OVERHEAD_MS:.0f} ms")
        if t.get("redis_over_farm_met") is False:
            missed.append(f"{name} redis/farm {r['redis_over_farm']:.1f}x < {TARGET_REDIS_OVER_FARM:.0f}x")
    return missed


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every ``finally`` below runs and nothing is left running."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    def progress(message: str) -> None:
        if not args.silent:
            print(message, file=sys.stderr, flush=True)

    payload_names = [p.strip() for p in args.payloads.split(",") if p.strip()]
    unknown = [p for p in payload_names if p not in PAYLOADS]
    if unknown:
        raise SystemExit(f"unknown payload(s) {', '.join(unknown)}: choose from {', '.join(PAYLOADS)}")
    password = secrets.token_urlsafe(24)
    farm_secret = secrets.token_hex(32)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reelfarm-bench-")))
        progress("starting valkey ...")
        server: ManagedServer = start_valkey(tmp / "valkey", None, password)
        stack.callback(server.stop)
        redis_url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        settings = _settings(redis_url, farm_secret, direct_receive=args.receive == "auto")
        progress("starting the producer process ...")
        producer = ProducerProcess(redis_url, farm_secret)
        stack.callback(producer.stop)
        rt = _runtime(CONSUMER_STAGE, settings)
        stack.callback(_close_runtime, rt)
        info: dict[str, Any] = rt.conn.info("server")  # type: ignore[assignment]
        receive = RECEIVE_PRIVATE if rt.engine.reads_into_private_memory else RECEIVE_SLOT
        progress(f"consumer receives into {receive}")
        for name in payload_names:
            progress(f"payload {name} ({PAYLOAD_LABELS[name]}) ...")
            watch = CpuWatch([os.getpid(), producer.proc.pid, server.pid])
            samples = bench_payload(name, rt, producer, rt.conn, args.repeats, args.warmup, progress)
            results[name] = payload_report(samples)
            results[name]["other_processes_cores"] = watch.other_cores()
        with contextlib.suppress(redis.RedisError):
            Queue(RQ_QUEUE, connection=rt.conn).delete(delete_jobs=True)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads_per_process": torch.get_num_threads(),
            "versions": _versions(info),
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "receive": receive,
        "definitions": {
            "farm": "producer Rooms.publish + consumer workers.handoff.pull_input (claim, verify, mark, pull, verify, ack)",
            "farm_plus_pack": "farm + producer stage_output (acquire slot, pack_tensors copy + checksum, sign)",
            "raw_read": "MooncakeEngine.batch_read of the same spans, alone",
            "farm_overhead_ms": "median over step-by-step hand-offs of (all steps but the batch_read): the farm's cost beyond its own raw read",
            "farm_minus_raw_read_ms": "median(farm) - median(raw_read), unpaired: includes the transport's jitter",
            "redis": "rq Queue.enqueue(tensors) with the default pickle serializer + Job.fetch + job.args",
            "redis_bytes": "informational, not a target: the payload's bytes through one Redis SET + GET (no rq, pickle or zlib)",
            "memcpy": "dst.copy_(src) between preallocated uint8 tensors of the payload's size, caches evicted first",
        },
        "payloads": results,
        "targets_missed": targets_missed(results),
        "busy_payloads": [n for n, p in results.items() if (p["other_processes_cores"] or 0.0) > BUSY_MACHINE_CORES],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.handoff",
        description="Measure the farm's Mooncake hand-off against the rq pickle path and a memcpy.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (5 repeats, 1 warm-up), under a minute")
    parser.add_argument("--repeats", type=int, default=None, help="measured repeats per payload (default 40; 5 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured repeats first (default 3; 1 quick)")
    parser.add_argument("--payloads", default=",".join(PAYLOADS), help="comma-separated subset of text,480p,720p")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--receive",
        choices=("auto", "slot"),
        default="auto",
        help="auto: what a worker does (TCP reads into private memory); slot: force the registered receive slot",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--producer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 40
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    return args


def torch_threads() -> int:
    """Intra-op threads per bench process: OMP_NUM_THREADS, else 1 like the embedded farm's workers.

    On a small host several torch processes with full OpenMP pools starve each other (the embedded
    farm pins one thread per worker for that reason); the producer child inherits the same value.
    """
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "1")), 1)
    except ValueError:
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(torch_threads())
    if args.producer:
        return producer_main()
    command = "python -m bench.handoff " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        with _terminate_as_interrupt():
            report = run(args, command.strip())
    except KeyboardInterrupt:
        print("interrupted; everything the bench started was stopped", file=sys.stderr)
        return 130
    print(render_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.strict and report["targets_missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
