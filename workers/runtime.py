"""One stage worker process: its loaded model, transfer engine, slot pool and background threads.

Lifecycle::

    1. load settings; check the farm secret and the advertised transfer address; connect to Redis
       (each a one-line exit when wrong: no secret, an address not this host's, Redis unreachable or refusing)
    2. load the stage's model ONCE (clear exit if the model dir is wrong)
    3. start the Mooncake engine and register the slot pool ONCE
    4. register the worker (stage, endpoint, model, load counter) and start heartbeating
    5. serve rq jobs with a non-forking worker that takes a job only when a slot is free
    6. on exit: deregister, stop threads, close the engine

Background threads: the heartbeat (rq's SimpleWorker does not heartbeat during a
job, so the farm's own liveness must not depend on it) and, for producing
stages, the ack listener that frees a slot when its consumer acknowledged or
when the room's lease ran out.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from scheduler.core import worker_registry
from scheduler.core.connection import connect_redis, eviction_warning, redis_client
from scheduler.core.descriptors import DescriptorLimits
from scheduler.core.keys import Stage, acks_key
from scheduler.core.reaper import ReaperThread
from scheduler.core.rooms import Rooms
from scheduler.core.settings import FarmSettings
from workers.advertised_address import check_advertised_address
from workers.slot_sizing import slot_bytes_for
from workers.stage_seam import StageCompute
from workers.transfer.mooncake_engine import MooncakeEngine
from workers.transfer.slot_pool import SlotPool

log = logging.getLogger("reelfarm.worker")

_CURRENT: StageRuntime | None = None


def current_runtime() -> StageRuntime:
    if _CURRENT is None:
        raise RuntimeError("no stage runtime in this process: stage jobs run only inside `reelfarm worker STAGE`")
    return _CURRENT


def make_worker_id(stage: Stage) -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:32]
    return f"{stage.value}-{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class HeldSlot:
    slot_index: int
    lease_expires_at: float


@dataclass
class StageRuntime:
    stage: Stage
    settings: FarmSettings
    conn: redis.Redis
    computes: dict[str, StageCompute]
    tasks: dict[str, str]
    engine: MooncakeEngine
    pool: SlotPool
    worker_id: str
    # Signs what this worker hands on (descriptors, next-stage calls); ``accepted_secrets`` verifies.
    secret: bytes
    accepted_secrets: tuple[bytes, ...] = ()
    s3: Any = None
    model_loads: int = 1
    held: dict[str, HeldSlot] = field(default_factory=dict)
    claims: set[str] = field(default_factory=set)
    # What the worker record shows, kept here too so a re-registration restores it rather than zeroing it.
    jobs_done: int = 0
    status: dict[str, str] = field(default_factory=lambda: {"state": "idle", "current_job": ""})
    # Set by the first SIGTERM while busy: a preemptible denoise saves at its next step and hands back.
    preempt: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Held across the write, so concurrent jobs' status updates land in the order they were decided.
    _status_lock: threading.Lock = field(default_factory=threading.Lock)
    _running_jobs: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _reaper: ReaperThread | None = None

    def __post_init__(self) -> None:
        if not self.accepted_secrets:
            self.accepted_secrets = (self.secret,)

    @functools.cached_property
    def rooms(self) -> Rooms:
        # Built once: the heartbeat and every hand-off use it, and it registers four scripts.
        return Rooms(self.conn)

    @functools.cached_property
    def background(self) -> ThreadPoolExecutor:
        """One thread for object-store writes the job thread must not wait for (checkpoints), in order."""
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-io")

    @property
    def produces(self) -> bool:
        """Whether this worker's jobs hand an output on (every stage kind but decode's)."""
        return self.stage is not Stage.DECODE

    @property
    def descriptor_limits(self) -> DescriptorLimits:
        return DescriptorLimits(max_payload_bytes=self.pool.slot_bytes)

    # -- registration and liveness -------------------------------------------------

    def register(self) -> None:
        self._register_record()
        self._start_thread(self._heartbeat_loop, "heartbeat")
        self._start_services()

    def _register_record(self) -> None:
        with self._lock:  # the job thread updates it while the heartbeat thread may re-register
            status = dict(self.status)
        info = {
            "stage": self.stage.value,
            # A transform worker holding one Wan2.2 expert: the hop it serves (`reelfarm info` shows it).
            **({"expert": self.settings.worker.expert} if self.settings.worker.expert else {}),
            "endpoint": self.engine.endpoint,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "models": ",".join(self.computes),
            "tasks": ",".join(f"{name}:{task}" for name, task in self.tasks.items()),
            "model_dir": str(self.settings.model_dir),
            "device": self.settings.worker.device,
            "model_loads": str(self.model_loads),
            "jobs_done": str(self.jobs_done),
            "slots": str(self.pool.num_slots),
            "slot_bytes": str(self.pool.slot_bytes),
            # How this worker receives payloads: "private" (TCP, straight into its tensors) or "slot" (copied out).
            "receive": "private" if self.engine.reads_into_private_memory else "slot",
            "started_at": repr(time.time()),
            **self._compute_fields(),
            **status,
        }
        worker_registry.register_worker(self.conn, self.worker_id, info, self.settings.worker.worker_ttl_seconds)

    def _start_services(self) -> None:
        if self.produces:
            self._start_thread(self._ack_loop, "ack-listener")
        # Every worker runs the maintenance loop and one at a time holds its lease: any live worker takes over.
        self._reaper = ReaperThread(
            self.conn,
            self.settings.worker.reaper_interval_seconds,
            self.settings.worker.max_attempts,
            # A worker that dies between dequeue and start is noticed on the same bound as one dying mid-job.
            stranded_after_seconds=self.settings.worker.worker_ttl_seconds,
            secret=self.secret,
            holder=self.worker_id,
            lease_seconds=self.settings.worker.worker_ttl_seconds,
        )
        self._reaper.start()

    def _start_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.worker.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    claims = list(self.claims)
                for room in claims:
                    self.rooms.renew_claim(room, self.worker_id, self.settings.worker.worker_ttl_seconds)
                with self._lock:
                    held = len(self.held)
                # held_outputs: part of the stage's demand (scheduler.core.demand), so scale-down spares it.
                fields = {"free_slots": str(self.pool.free_count), "held_outputs": str(held), **self._compute_fields()}
                if not worker_registry.heartbeat(
                    self.conn, self.worker_id, self.settings.worker.worker_ttl_seconds, fields
                ):
                    # Expired (a pause or a Redis outage longer than the TTL) or lost with a Redis that
                    # restarted empty: without a record this worker's outputs would be refused as coming
                    # from a dead producer, and the reaper would restart whatever it runs.
                    self._register_record()
                    log.warning("worker record had expired (missed heartbeats); re-registered")
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # noqa: BLE001 - a dead heartbeat thread would make the farm reap a live worker
                log.exception("heartbeat failed")

    def _compute_fields(self) -> dict[str, str]:
        """What a stage's computes report about themselves (a decode group's ranks, grid and health)."""
        fields: dict[str, str] = {}
        for compute in self.computes.values():
            fields.update(compute.record_fields())
        return fields

    def job_began(self, job_id: str) -> None:
        """Show ``job_id`` as running (a transform worker runs a batch of jobs at once, one thread each)."""
        with self._status_lock:
            self._running_jobs.append(job_id)
            self.set_status(state="busy", current_job=",".join(self._running_jobs))

    def job_ended(self, job_id: str) -> None:
        with self._status_lock:
            if job_id in self._running_jobs:
                self._running_jobs.remove(job_id)
            running = ",".join(self._running_jobs)
            self.set_status(state="busy" if running else "idle", current_job=running)

    def set_status(self, **fields: str) -> None:
        """Show ``fields`` (state, current_job, metrics, ...) in the worker record, now and after a re-registration."""
        with self._lock:
            self.status.update(fields)
        worker_registry.update_worker(self.conn, self.worker_id, fields)

    # -- claims this worker holds (renewed by the heartbeat) ---------------------------

    def begin_claim(self, room_key: str) -> None:
        with self._lock:
            self.claims.add(room_key)

    def end_claim(self, room_key: str) -> None:
        with self._lock:
            self.claims.discard(room_key)

    # -- slots held for consumers --------------------------------------------------

    def hold_slot(self, room_key: str, slot_index: int, lease_expires_at: float) -> None:
        with self._lock:
            self.held[room_key] = HeldSlot(slot_index, lease_expires_at)

    def free_slot_of(self, room_key: str, why: str) -> None:
        with self._lock:
            held = self.held.pop(room_key, None)
        if held is not None:
            self.pool.release(held.slot_index)
            log.info("freed slot %d of %s (%s)", held.slot_index, room_key, why)

    def _ack_loop(self) -> None:
        # A dedicated connection: BLPOP blocks it.
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
                self.free_slot_of(room.decode() if isinstance(room, bytes) else room, "acknowledged")
            self._expire_leases()

    def _expire_leases(self) -> None:
        now = time.time()
        with self._lock:
            expired = [room for room, held in self.held.items() if held.lease_expires_at < now]
        for room in expired:
            self.rooms.fail(room, "lease expired before the consumer acknowledged; the producer freed the slot")
            self.free_slot_of(room, "lease expired")

    def wait_for_free_slot(self, timeout: float) -> bool:
        return self.pool.wait_for_free(timeout)

    # -- shutdown ------------------------------------------------------------------

    def drain(self) -> None:
        """Before exiting, keep serving held slots until their consumers ack (or the grace period ends)."""
        deadline = time.monotonic() + self.settings.worker.shutdown_grace_seconds
        while self.held and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.held:
            log.warning("exiting with %d unacknowledged outputs; consumers will recompute them", len(self.held))

    def close(self) -> None:
        if "background" in self.__dict__:
            # Finish the checkpoint writes already started: each is what a recovery would read.
            self.background.shutdown(wait=True)
        self._stop.set()
        if self._reaper is not None:
            self._reaper.stop()
        for thread in self._threads:
            thread.join(timeout=3)
        try:
            worker_registry.deregister_worker(self.conn, self.worker_id)
        except redis.RedisError:
            pass
        self.engine.close()
        for compute in self.computes.values():
            compute.close()  # a rank group's follower processes


def transfer_engine(settings: FarmSettings, log_level: str | None = None) -> MooncakeEngine:
    """The worker's Mooncake engine, configured from ``settings.transfer``."""
    return MooncakeEngine(
        hostname=settings.transfer.hostname,
        protocol=settings.transfer.protocol,
        device_name=settings.transfer.device_name,
        transfer_timeout_s=settings.transfer.transfer_timeout_seconds,
        private_destinations=settings.transfer.direct_receive,
        log_level=log_level,
    )


def connect_store(settings: FarmSettings) -> Any:
    """A client for the farm's bucket, created if missing and checked reachable before any job arrives."""
    # Imported here: the farm's storage module loads only in a stage that uses the store.
    from scheduler.core.object_store import check_reachable, ensure_bucket

    client = settings.s3.client()
    ensure_bucket(client, settings.s3.bucket)
    check_reachable(client, settings.s3.bucket)
    return client


# Loads every model a worker of a stage serves: its computes and their tasks, by model name
# (``workers.stage_compute.load_all``; passed in, so the runtime never imports model code).
ComputeLoader = Callable[[Stage, FarmSettings], tuple[dict[str, StageCompute], dict[str, str]]]


def start_runtime(stage: Stage, settings: FarmSettings, load_computes: ComputeLoader) -> StageRuntime:
    """Steps 1-4 of the lifecycle; raises ``WorkerStartupError`` with a one-line reason."""
    global _CURRENT
    # Cheap checks first, each a one-line refusal: the farm secret, the advertised address, then Redis.
    accepted = settings.accepted_secrets()
    nat_warning = check_advertised_address(settings.transfer.hostname, settings.transfer.allow_nat_hostname)
    if nat_warning:
        log.warning(nat_warning)
    conn = connect_redis(settings)
    warning = eviction_warning(conn)
    if warning:
        log.warning(warning)
    computes, tasks = load_computes(stage, settings)
    s3 = None
    # Decode uploads results; an i2v encoder reads each job's conditioning image from the bucket;
    # with checkpoints on, transform writes them and decode reads them.
    checkpoints = settings.checkpoints.enabled and stage is Stage.TRANSFORM
    if stage is Stage.DECODE or checkpoints or (stage is Stage.ENCODE and "i2v" in tasks.values()):
        s3 = connect_store(settings)
    engine = transfer_engine(settings)
    slot_bytes = (
        settings.transfer.slot_mb * 2**20
        if settings.transfer.slot_mb
        else slot_bytes_for(
            stage,
            list(settings.served_models().values()),
            settings.limits,
            split=settings.transform.split_at_step is not None,
        )
    )
    slots = settings.transfer.slots
    if stage is Stage.TRANSFORM:
        # Every job of a batch hands off its own output: a batch of B needs B slots at once.
        slots = max(slots, settings.transform.batch_size)
    log.info("transfer pool: %d slots of %.1f MiB", slots, slot_bytes / 2**20)
    pool = SlotPool(engine, slot_bytes=slot_bytes, num_slots=slots)
    runtime = StageRuntime(
        stage=stage,
        settings=settings,
        conn=conn,
        computes=computes,
        tasks=tasks,
        engine=engine,
        pool=pool,
        worker_id=make_worker_id(stage),
        secret=accepted[0],
        accepted_secrets=accepted,
        s3=s3,
    )
    runtime.register()
    _CURRENT = runtime
    return runtime
