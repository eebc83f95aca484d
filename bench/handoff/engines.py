"""The two ends of the measured hand-off: a stage runtime without a model, and the producer process.

The consumer is the bench's own process; the producer is a child (``python -m
bench.handoff --producer``) with its own ``StageRuntime`` -- Mooncake engine,
slot pool registered once, a registered live worker with heartbeat and ack
listener -- talking JSON lines over its stdin/stdout, so the Redis URL and the
farm secret never appear on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from bench.handoff.payloads import make_payload
from scheduler.core.connection import connect_redis
from scheduler.core.descriptors import TensorEntry
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings, TransferSettings
from workers.handoff import stage_output
from workers.runtime import StageRuntime, make_worker_id, transfer_engine
from workers.transfer import SlotPool

REPO = Path(__file__).resolve().parents[2]

# The producer and consumer stages of the bench's hand-off: the verification pull_input does depends
# on the producer being a live worker of the upstream stage, not on which stages they are.
PRODUCER_STAGE = Stage.ENCODE
CONSUMER_STAGE = Stage.TRANSFORM

REPLY_TIMEOUT_S = 120.0
SLOT_MB = 32  # the 720p latents are 18.5 MiB


def bench_settings(redis_url: str, secret: str, direct_receive: bool = True) -> FarmSettings:
    # Slots sized for the largest bench payload, not from model configs (the bench loads no model).
    transfer = TransferSettings(slot_mb=SLOT_MB, direct_receive=direct_receive)
    return FarmSettings(redis_url=redis_url, secret=secret, transfer=transfer)


def bench_runtime(stage: Stage, settings: FarmSettings) -> StageRuntime:
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


def close_runtime(rt: StageRuntime) -> None:
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
    rt = bench_runtime(PRODUCER_STAGE, bench_settings(hello["redis_url"], hello["secret"]))
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
        close_runtime(rt)
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


def torch_threads() -> int:
    """Intra-op threads per bench process: OMP_NUM_THREADS, else 1 like the embedded farm's workers.

    On a small host several torch processes with full OpenMP pools starve each other (the embedded
    farm pins one thread per worker for that reason); the producer child inherits the same value.
    """
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "1")), 1)
    except ValueError:
        return 1
