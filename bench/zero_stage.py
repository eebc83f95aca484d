"""A stage worker process with no model: the farm's whole Redis protocol per stage job, zero compute, no torch.

For the control-plane ceiling (``bench.control_plane``). A real stage worker
(``python -m workers STAGE``) loads torch, a model and a Mooncake engine, so 50
of them do not fit on a small machine; this one imports only the control plane
(``scheduler.core``) and rq, so a bench can fork dozens. It sends Redis what a
real worker sends, in the same order, by calling the same ``scheduler.core``
functions that ``workers.stage_job``, ``workers.handoff``, ``workers.runtime``
and ``workers.stage_worker`` call (those modules import torch, so their few
lines of glue are mirrored here, step for step, rather than imported):

- **start-up** (``workers.runtime.StageRuntime.register``): the worker record
  with the same fields (``worker_registry.register_worker``), the heartbeat
  thread (claim renewals, ``worker_registry.heartbeat`` every
  ``heartbeat_seconds``), for producers the ack listener (``BLPOP`` on its ack
  list, 1 s timeout), and the reaper thread (``scheduler.core.reaper``), which
  every real worker runs;
- **dequeue** (``workers.stage_worker.StageWorker``): rq's own ``SimpleWorker``
  work loop, dequeue and bookkeeping (started/finished registries, executions,
  results, rq heartbeats), trimmed the same way (both subclass
  ``queues.FarmWorker``, not a mirror), behind the same backpressure rule (a producer with
  no free slot takes no job) and the same call check
  (``queues.call_fields`` + ``stage_calls.vet_call``) before rq runs anything;
- **the stage job** (``workers.stage_job._run_stage``): record read, cancel
  check, start fence (``jobs.mark_stage_started``), busy status, spec read;
  consumers pull (``workers.handoff.pull_input``): ``Rooms.claim_and_read``,
  ``verify_descriptor`` (signature, lease, bounds), ``Rooms.begin_transfer``
  (producer live at its registered endpoint), ``check_producer_endpoint``,
  ``Rooms.ack`` (which tells the producer to free its slot), ``set_recovery``;
  then the compute's own Redis calls: transform reads the record for a resume
  checkpoint, writes progress and reads the cancel flag per step (``jobs.ProgressWrites``),
  ``set_dit_report`` at the end and records the latents checkpoint
  (``jobs.record_checkpoint``) after the hand-off; decode reads the status for
  the metadata JSON; then ``_finish``'s WATCH/MULTI (``mark_stage_finished``,
  ``Rooms.publish`` + ``job_retry.queue_stage``, or ``mark_succeeded``;
  ``worker_registry.increment``) and the idle status.

Not exercised: the model compute; the Mooncake engine (no buffers registered,
no bytes moved: a descriptor names a slot of an address range no engine
serves, and the consumer stops after verifying it and marking the room
TRANSFERRING, exactly where the byte transfer would start); packing and
payload checksums; the object store (checkpoint bytes, the video upload) --
only what those steps write to Redis is sent. Failure paths (restarts,
refusals, cancels) are not taken: a bench job that fails is marked failed and
ends the bench.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from rq.job import Job  # bench only: the job class below resolves the stage entrypoint to this module

from scheduler.core import job_retry, jobs, keys, worker_metrics, worker_registry
from scheduler.core.connection import connect_redis, redis_client
from scheduler.core.descriptors import (
    Descriptor,
    DescriptorLimits,
    DescriptorRefused,
    TensorEntry,
    check_producer_endpoint,
    verify_descriptor,
)
from scheduler.core.job_record import Routing, StageField, attempt_of, is_finished
from scheduler.core.keys import Hop, Stage, acks_key
from scheduler.core.queues import (
    STAGE_ENTRYPOINT,
    FarmWorker,
    JSONSerializer,
    call_fields,
    clean_registries_without_hooks,
    stage_queues_by_priority,
)
from scheduler.core.reaper import ReaperThread
from scheduler.core.rooms import Rooms, RoomState
from scheduler.core.route import THREE_HOPS
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec
from scheduler.core.stage_calls import StageCall, vet_call

log = logging.getLogger("reelfarm.bench.zero_stage")

SLOT_BYTES = 64 * 2**20  # what the worker record and the descriptors say; nothing is allocated
_FAKE_BASE = 0x7F00_0000_0000  # descriptors name addresses in a range no engine serves
_CHECKSUM = "xxh3_128:" + "0" * 32


class BenchJobFailed(RuntimeError):
    """A bench job hit a path the zero-compute worker does not take (a refusal, a lost room)."""


@dataclass
class ZeroRuntime:
    """``workers.runtime.StageRuntime`` without a model, an engine or a pool: slots are counted, not allocated."""

    stage: Stage
    settings: FarmSettings
    conn: redis.Redis
    worker_id: str
    secret: bytes
    endpoint: str
    held: dict[str, float] = field(default_factory=dict)  # room -> lease expiry of the output held for it
    claims: set[str] = field(default_factory=set)
    jobs_done: int = 0
    status: dict[str, str] = field(default_factory=lambda: {"state": "idle", "current_job": ""})
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slot_freed: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _reaper: ReaperThread | None = None

    @functools.cached_property
    def rooms(self) -> Rooms:
        return Rooms(self.conn)

    @property
    def produces(self) -> bool:
        return self.stage is not Stage.DECODE

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.settings.transfer.slots - len(self.held)

    def register(self) -> None:
        info = {
            "stage": self.stage.value,
            "endpoint": self.endpoint,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "models": keys.DEFAULT_MODEL,
            "tasks": f"{keys.DEFAULT_MODEL}:t2v",
            "model_dir": str(self.settings.model_dir),
            "device": self.settings.worker.device,
            "model_loads": "1",
            "jobs_done": str(self.jobs_done),
            "slots": str(self.settings.transfer.slots),
            "slot_bytes": str(SLOT_BYTES),
            "receive": "private",
            "started_at": repr(time.time()),
            **self.status,
        }
        worker_registry.register_worker(self.conn, self.worker_id, info, self.settings.worker.worker_ttl_seconds)
        self._start_thread(self._heartbeat_loop, "heartbeat")
        if self.produces:
            self._start_thread(self._ack_loop, "ack-listener")
        worker = self.settings.worker
        self._reaper = ReaperThread(
            self.conn,
            worker.reaper_interval_seconds,
            worker.max_attempts,
            stranded_after_seconds=worker.worker_ttl_seconds,
            secret=self.secret,
            holder=self.worker_id,
            lease_seconds=self.settings.worker.worker_ttl_seconds,
        )
        self._reaper.start()

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _heartbeat_loop(self) -> None:
        ttl = self.settings.worker.worker_ttl_seconds
        while not self._stop.wait(self.settings.worker.heartbeat_seconds):
            try:
                with self._lock:
                    claims, held = list(self.claims), len(self.held)
                for room in claims:
                    self.rooms.renew_claim(room, self.worker_id, ttl)
                fields = {"free_slots": str(self.settings.transfer.slots - held), "held_outputs": str(held)}
                worker_registry.heartbeat(self.conn, self.worker_id, ttl, fields)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _ack_loop(self) -> None:
        listener = redis_client(self.settings)
        key = acks_key(self.worker_id)
        while not self._stop.is_set():
            try:
                popped = listener.blpop([key], timeout=1)
            except redis.RedisError as exc:
                log.warning("ack listener: %s", exc)
                self._stop.wait(1.0)
                continue
            if popped is not None:
                room = popped[1]
                self.free_slot_of(room.decode() if isinstance(room, bytes) else room)
            now = time.time()
            with self._lock:
                expired = [room for room, lease in self.held.items() if lease < now]
            for room in expired:
                self.rooms.fail(room, "lease expired before the consumer acknowledged; the producer freed the slot")
                self.free_slot_of(room)

    def hold_slot(self, room_key: str, lease_expires_at: float) -> int:
        """Take a free slot for ``room_key`` (backpressure made sure there is one); returns its index."""
        with self._lock:
            index = len(self.held)
            self.held[room_key] = lease_expires_at
        return index

    def free_slot_of(self, room_key: str) -> None:
        with self._lock:
            self.held.pop(room_key, None)
        with self._slot_freed:
            self._slot_freed.notify_all()

    def wait_for_free_slot(self, timeout: float) -> bool:
        with self._slot_freed:
            return self._slot_freed.wait_for(lambda: self.free_slots > 0, timeout)

    def set_status(self, **fields: str) -> None:
        with self._lock:
            self.status.update(fields)
        worker_registry.update_worker(self.conn, self.worker_id, fields)

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.stop()
        for thread in self._threads:
            thread.join(timeout=3)
        try:
            worker_registry.deregister_worker(self.conn, self.worker_id)
        except redis.RedisError:
            pass


_CURRENT: ZeroRuntime | None = None


def _runtime() -> ZeroRuntime:
    if _CURRENT is None:
        raise RuntimeError("no zero-compute runtime in this process")
    return _CURRENT


# --------------------------------------------------------------------------- the stage job


def run_zero_stage(job_id: str, stage: str, attempt: int, upstream_attempt: int | None) -> dict[str, Any]:
    """``workers.stage_job._run_stage`` with zero compute: the same Redis calls, in the same order."""
    rt = _runtime()
    this_stage = Stage(stage)
    fields = jobs.job_fields(rt.conn, job_id)
    if not fields or is_finished(fields) or attempt_of(fields, this_stage) != attempt:
        return {"job_id": job_id, "stage": stage, "outcome": "skipped"}
    if jobs.cancel_requested(rt.conn, job_id):
        raise BenchJobFailed("a bench job was cancelled")
    started = time.monotonic()
    if not jobs.mark_stage_started(rt.conn, job_id, this_stage, rt.worker_id, attempt):
        return {"job_id": job_id, "stage": stage, "outcome": "skipped"}
    rt.set_status(state="busy", current_job=job_id)
    outcome = "done"
    try:
        spec = jobs.load_spec(rt.conn, job_id)
        pulled: tuple[int, float] | None = None
        upstream = THREE_HOPS.previous(this_stage)
        if upstream is not None:
            pull_started = time.monotonic()
            desc = _pull_input(rt, job_id, upstream, upstream_attempt or 1)
            jobs.set_recovery(rt.conn, job_id, rt.stage, "pulled")
            pulled = (desc.payload_nbytes, time.monotonic() - pull_started)
        compute_started = time.monotonic()
        outputs = _zero_compute(rt, job_id, spec)
        if not _finish(rt, job_id, spec, attempt, outputs, started, time.monotonic() - compute_started, pulled):
            outcome = "superseded"
    except Exception as exc:  # noqa: BLE001 - the driver reads the record: a bench job must not hang
        outcome = f"failed: {exc}"
        pipe = rt.conn.pipeline(transaction=True)
        jobs.clear_inflight(pipe, job_id, this_stage, attempt)
        jobs.mark_failed(pipe, job_id, this_stage, f"zero-compute bench: {exc}")
        pipe.execute()
    finally:
        rt.set_status(state="idle", current_job="")
    worker_metrics.observe_stage(this_stage, time.monotonic() - started, outcome)
    return {"job_id": job_id, "stage": stage, "outcome": outcome, "seconds": round(time.monotonic() - started, 3)}


def _pull_input(rt: ZeroRuntime, job_id: str, upstream: Hop, upstream_attempt: int) -> Descriptor:
    """``workers.handoff.pull_input`` up to the byte transfer, then the ack."""
    room_key = keys.room_key(job_id, upstream, upstream_attempt)
    room = rt.rooms.claim_and_read(room_key, rt.worker_id, rt.settings.worker.worker_ttl_seconds)
    if room is None:
        raise BenchJobFailed(f"input room {room_key} cannot be claimed ({rt.rooms.state(room_key).name})")
    with rt._lock:
        rt.claims.add(room_key)
    try:
        limits = DescriptorLimits(max_payload_bytes=SLOT_BYTES)
        desc = verify_descriptor(room.get("descriptor", ""), room.get("signature", ""), (rt.secret,), limits)
        if desc.job_id != job_id or desc.producer_stage != upstream.value or desc.attempt != upstream_attempt:
            raise DescriptorRefused("descriptor belongs to another room")
        state, registered_endpoint = rt.rooms.begin_transfer(room_key, rt.worker_id, desc)
        check_producer_endpoint(desc, registered_endpoint)
        if state is not RoomState.TRANSFERRING:
            raise BenchJobFailed(f"room {room_key} was taken over before the transfer ({state.name})")
        # Here a real consumer reads desc.payload_nbytes bytes from the producer's slot and checks them.
        worker_metrics.observe_handoff(rt.stage, desc.payload_nbytes, 0.0)
        if not rt.rooms.ack(room_key, rt.worker_id, desc.producer_id):
            raise BenchJobFailed(f"room {room_key} was taken over before the ack")
        return desc
    except DescriptorRefused as exc:
        rt.rooms.fail(room_key, str(exc))
        raise BenchJobFailed(f"refused room {room_key}: {exc}") from None
    finally:
        with rt._lock:
            rt.claims.discard(room_key)


def _output_entries(stage: Stage, spec: JobSpec) -> list[TensorEntry]:
    """The tensors a stage hands on for ``spec``, as the production-shape model's descriptor lists them."""
    shape: tuple[int, ...]
    if stage is Stage.ENCODE:
        shape, dtype, itemsize = (1, 512, 4096), "bfloat16", 2
        names = ["prompt_embeds", "negative_prompt_embeds"]
    else:
        shape = (1, 16, (spec.frames - 1) // 4 + 1, spec.height // 8, spec.width // 8)
        dtype, itemsize, names = "float32", 4, ["latents"]
    nbytes = itemsize
    for size in shape:
        nbytes *= size
    return [
        TensorEntry(name=name, dtype=dtype, shape=shape, offset=i * nbytes, nbytes=nbytes)  # type: ignore[arg-type]
        for i, name in enumerate(names)
    ]


def _zero_compute(rt: ZeroRuntime, job_id: str, spec: JobSpec) -> dict[str, Any]:
    """What the stage's compute (``workers.stage_compute``) sends Redis, without the compute."""
    if rt.stage is Stage.TRANSFORM:
        if rt.settings.checkpoints.enabled and spec.cache is None:
            jobs.job_fields(rt.conn, job_id)  # checkpoints.state_from_checkpoint: is there a state to resume?
        progress = jobs.ProgressWrites(rt.conn, job_id, Stage.TRANSFORM)  # as workers.transform_compute
        for step in range(spec.steps):
            if progress.should_stop():  # before each step
                raise BenchJobFailed("a bench job was cancelled")
            progress.on_step(step + 1, spec.steps)  # after it
        jobs.set_dit_report(rt.conn, job_id, {"bench": "zero-compute"})
    if rt.stage is Stage.DECODE:
        status = jobs.read_status(rt.conn, job_id)  # render_upload: timings and workers for the metadata JSON
        return {"video": f"s3://{rt.settings.s3.bucket}/{job_id}.mp4", "bytes": 0, "frames": spec.frames,
                "created_at": status["created_at"]}  # fmt: skip
    return {}


def _finish(
    rt: ZeroRuntime,
    job_id: str,
    spec: JobSpec,
    attempt: int,
    outputs: dict[str, Any],
    started: float,
    compute_seconds: float,
    pulled: tuple[int, float] | None,
) -> bool:
    """``workers.stage_job._finish``: publish and enqueue the next stage (or record the result), fenced."""
    next_stage = THREE_HOPS.next(rt.stage)
    room_key = keys.room_key(job_id, rt.stage, attempt)
    desc, signature = None, ""
    if next_stage is not None:
        # workers.handoff.stage_output: take a slot, describe it, hold it, sign.
        now = time.time()
        lease = now + rt.settings.worker.lease_seconds
        slot = rt.hold_slot(room_key, lease)
        desc = Descriptor(
            job_id=job_id,
            producer_stage=rt.stage.value,
            attempt=attempt,
            producer_id=rt.worker_id,
            endpoint=rt.endpoint,
            slot_base=_FAKE_BASE + slot * SLOT_BYTES,
            slot_bytes=SLOT_BYTES,
            tensors=tuple(_output_entries(rt.stage, spec)),
            checksum=_CHECKSUM,
            created_at=now,
            lease_expires_at=lease,
        )
        signature = desc.sign(rt.secret)
    with rt.conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(keys.job_key(job_id))
                fields = jobs.job_fields(pipe, job_id)
                if attempt_of(fields, rt.stage) != attempt or is_finished(fields):
                    pipe.unwatch()
                    rt.free_slot_of(room_key)
                    jobs.clear_inflight(rt.conn, job_id, rt.stage, attempt)
                    return False
                pipe.multi()
                jobs.mark_stage_finished(
                    pipe, job_id, rt.stage, attempt, time.monotonic() - started, compute_seconds, pulled
                )
                if next_stage is not None and desc is not None:
                    next_call = StageCall(job_id, next_stage, attempt_of(fields, next_stage) + 1, attempt)
                    rt.rooms.publish(desc, signature, pipeline=pipe)
                    job_retry.queue_stage(pipe, rt.conn, next_call, Routing(spec.priority, spec.model), secret=rt.secret)
                else:
                    jobs.mark_succeeded(pipe, job_id, outputs)
                worker_registry.increment(pipe, rt.worker_id, "jobs_done")
                pipe.execute()
                rt.jobs_done += 1
                break
            except redis.WatchError:
                continue
    if rt.stage is Stage.TRANSFORM and rt.settings.checkpoints.enabled:
        # workers.checkpoints.save_latents, after the publish; only its record write, not the object.
        ref = f'{{"key": "checkpoints/{job_id}/latents-{attempt}", "bytes": 0, "attempt": {attempt}}}'
        jobs.record_checkpoint(rt.conn, job_id, Stage.TRANSFORM, attempt, StageField.CHECKPOINT, ref)
    return True


# --------------------------------------------------------------------------- rq's side


class ZeroComputeJob(Job):
    """An rq job whose stage entrypoint resolves to ``run_zero_stage`` (anything else is refused before this)."""

    @property
    def func(self) -> Any:
        if self.func_name == STAGE_ENTRYPOINT:
            return run_zero_stage
        raise BenchJobFailed(f"the zero-compute worker runs only {STAGE_ENTRYPOINT}, not {self.func_name}")


class ZeroComputeWorker(FarmWorker):
    """``workers.stage_worker.StageWorker``'s backpressure and call check around rq's own work loop."""

    runtime: ZeroRuntime

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        while self.runtime.produces and not self.runtime.wait_for_free_slot(timeout=1.0):
            self.heartbeat()
            if self._stop_requested:
                return None
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def execute_job(self, job: Any, queue: Any) -> None:
        vet_call(call_fields(job), self.runtime.stage, (self.runtime.secret,))  # a bench call is always signed
        super().execute_job(job, queue)

    def clean_registries(self) -> None:
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                clean_registries_without_hooks(queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = datetime.now(UTC)  # type: ignore[assignment]


def serve(stage: Stage, settings: FarmSettings, index: int) -> None:
    """Run one zero-compute stage worker until SIGTERM (the body of a forked bench worker process)."""
    global _CURRENT
    logging.basicConfig(level=logging.WARNING)
    conn = connect_redis(settings)
    worker_id = f"{stage.value}-zero-{os.getpid()}-{index}"
    # A registered endpoint of its own, as a real worker's engine has; nothing listens there.
    runtime = ZeroRuntime(stage, settings, conn, worker_id, settings.require_secret(), f"127.0.0.1:{20000 + index}")
    runtime.register()
    _CURRENT = runtime
    worker = ZeroComputeWorker(
        stage_queues_by_priority(conn, stage),
        connection=conn,
        serializer=JSONSerializer,
        name=worker_id,
        job_class=ZeroComputeJob,
    )
    worker.runtime = runtime
    try:
        worker.work(burst=False, logging_level="WARNING", with_scheduler=False)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        runtime.close()
