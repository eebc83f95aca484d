"""The embedded farm: everything ``reelfarm`` needs on this machine, under one folder.

``reelfarm up`` starts a Valkey/Redis server (persistence on, loopback only,
generated password), a SeaweedFS S3 server, builds the tiny model if the model
dir is missing, and starts one worker per stage; it writes the farm's settings
(secrets included, mode 0600) to ``<home>/farm.json`` so later commands find
it. ``reelfarm down`` stops what that file lists. Workers are started as
``python -m workers STAGE`` processes: the control plane never imports them.
The HTTP front runs as ``python -m scheduler.http`` on a free loopback port
with a generated API key: its digest goes into the settings, the key itself
only into the 0600 state file, where ``reelfarm up`` reads it to show it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.core import worker_registry
from scheduler.core.connection import connect_redis
from scheduler.core.errors import UserError
from scheduler.core.keys import Hop, Stage
from scheduler.core.settings import STATE_FILE_NAME, FarmSettings, api_key_hash
from scheduler.local.processes import free_port, stop_pid, write_private
from scheduler.local.seaweedfs import S3_STOP_TIMEOUT, start_s3_server
from scheduler.local.valkey import start_valkey

# Small sizes so the embedded default renders in seconds on a CPU with the tiny model.
TINY_SPEC_DEFAULTS: dict[str, Any] = {"width": 128, "height": 96, "frames": 33, "steps": 12, "fps": 16}
WORKER_START_TIMEOUT = 180.0
HTTP_START_TIMEOUT = 30.0


class EmbeddedFarmError(UserError, RuntimeError):
    pass


def state_path(home: Path) -> Path:
    return home / STATE_FILE_NAME


def read_state(home: Path) -> dict[str, Any] | None:
    path = state_path(home)
    if not path.exists():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _write_state(home: Path, state: dict[str, Any]) -> None:
    write_private(state_path(home), json.dumps(state, indent=2))


def write_settings_file(settings: FarmSettings, path: Path) -> Path:
    """The complete settings (secrets included) as a config file a worker can load (JSON is YAML)."""
    return write_private(path, settings.model_dump_json(indent=2))


@dataclass(frozen=True)
class WorkerSlot:
    """One worker the embedded farm starts: its stage, its thread count and the CPUs it is pinned to."""

    stage: Stage
    index: int
    threads: int = 1
    cpus: frozenset[int] | None = None
    # A transform worker holding one Wan2.2 expert (``--expert``), serving that expert's hop.
    expert: str | None = None

    @property
    def name(self) -> str:
        part = f"-{self.expert}" if self.expert else ""
        return f"{self.stage.value}{part}-{self.index}"

    @property
    def args(self) -> tuple[str, ...]:
        return ("--expert", self.expert) if self.expert else ()


def plan_workers(layout: Mapping[Hop, int] | Mapping[Stage, int], cpus: list[int]) -> list[WorkerSlot]:
    """Give each worker its share of this host's CPUs.

    With no more workers than CPUs, each worker is pinned to CPUs of its own and
    runs that many threads (CPUs left over go to transform workers, the DiT being
    the expensive stage); with more, every worker runs one thread, unpinned, and
    the OS shares the CPUs -- several torch thread pools on one small host starve
    each other otherwise (12 tiny jobs: 64 s with default threading, 5 s with one
    thread each). That holds for the DiT too: on 2 CPUs, a 2-thread DiT beside
    1-thread encode and decode workers ran the bench preset at a third of the
    speed of a 1-thread one (bench.pipeline, layouts 1:1:1 vs 1:1:1x1), and two
    1-thread transform workers (``--workers transform=2``) were fastest of all.
    """
    # A hop with a part (transform@high) is a worker of its kind holding that expert.
    order = [(hop, i) for hop, count in layout.items() for i in range(count)]
    if len(order) > len(cpus):
        return [WorkerSlot(hop.kind, i, expert=hop.part) for hop, i in order]
    shares = [len(cpus) // len(order)] * len(order)
    transform = [n for n, (hop, _) in enumerate(order) if hop.kind is Stage.TRANSFORM] or list(range(len(order)))
    for extra in range(len(cpus) - sum(shares)):
        shares[transform[extra % len(transform)]] += 1
    slots, start = [], 0
    for (hop, i), share in zip(order, shares, strict=True):
        slots.append(WorkerSlot(hop.kind, i, share, frozenset(cpus[start : start + share]), hop.part))
        start += share
    return slots


def worker_env(settings: FarmSettings, threads: int | None = None) -> dict[str, str]:
    """Environment that points a worker process at this farm: its whole settings, via one config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REELFARM_")}
    # One thread unless planned otherwise (see plan_workers).
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["REELFARM_CONFIG"] = str(write_settings_file(settings, settings.home / "worker-settings.json"))
    return env


def build_tiny_model(model_dir: Path, log_path: Path, i2v: bool = False) -> None:
    command = [sys.executable, "-m", "workers.models", "tiny", str(model_dir), *(["--i2v"] if i2v else [])]
    with log_path.open("ab") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise EmbeddedFarmError(f"building the tiny model in {model_dir} failed; see {log_path}")


def start_worker(
    stage: Stage,
    settings: FarmSettings,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    slot: WorkerSlot | None = None,
    launcher: Sequence[str] = (),
    log_name: str | None = None,
) -> subprocess.Popen[bytes]:
    """One ``python -m workers STAGE`` process; ``slot`` sets its threads and CPUs (else one thread, unpinned).

    ``launcher`` is a command the worker runs under (the multi-host test's ``ip netns exec NAME``);
    ``log_name`` names its log (``worker-<log_name>.log``) when several workers of a stage share ``log_dir``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    name = log_name or (stage.value if slot is None or (slot.index == 0 and not slot.expert) else slot.name)
    log = (log_dir / f"worker-{name}.log").open("ab")
    proc = subprocess.Popen(
        [*launcher, sys.executable, "-m", "workers", stage.value, *(slot.args if slot else ())],
        env={**worker_env(settings, slot.threads if slot else None), **(extra_env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if slot is not None and slot.cpus:
        # Set before torch starts its thread pools (seconds later), which inherit it.
        os.sched_setaffinity(proc.pid, slot.cpus)
    return proc


def wait_for_workers(
    settings: FarmSettings, stages: list[Stage], procs: list[subprocess.Popen[bytes]], log_dir: Path
) -> None:
    conn = connect_redis(settings)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    expected = {str(p.pid) for p in procs}
    while time.monotonic() < deadline:
        records = worker_registry.live_workers(conn)
        live = {w.get("stage") for w in records}
        registered = {w.get("pid") for w in records}
        if all(s.value in live for s in stages) and expected <= registered:
            return
        for proc in procs:
            if proc.poll() is not None:
                raise EmbeddedFarmError(f"a worker exited during start-up (code {proc.returncode}); see {log_dir}")
        time.sleep(0.2)
    raise EmbeddedFarmError(f"workers did not register within {WORKER_START_TIMEOUT:.0f}s; see {log_dir}")


def start_http_front(settings: FarmSettings, log_dir: Path) -> subprocess.Popen[bytes]:
    """``python -m scheduler.http`` for this farm, waited for until its /healthz answers."""
    log_path = log_dir / "http.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.http"],
            env=worker_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + HTTP_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedFarmError(f"the HTTP front exited during start-up (code {proc.returncode}); see {log_path}")
        try:
            with socket.create_connection((settings.http.host, settings.http.port), timeout=1.0):
                return proc
        except OSError:
            time.sleep(0.1)
    stop_pid(proc.pid)
    raise EmbeddedFarmError(f"the HTTP front did not listen within {HTTP_START_TIMEOUT:.0f}s; see {log_path}")


def farm_up(settings: FarmSettings) -> FarmSettings:
    """Start the embedded farm (idempotent: returns the running one's settings)."""
    home = settings.home.resolve()
    existing = read_state(home)
    if existing is not None:
        return FarmSettings.model_validate(existing["settings"])
    home.mkdir(parents=True, exist_ok=True)
    log_dir = home / "logs"
    log_dir.mkdir(exist_ok=True)
    password = secrets.token_hex(16)
    api_key = "rf-" + secrets.token_urlsafe(32)
    access_key, secret_key = "reelfarm", secrets.token_hex(16)
    started: list[int] = []
    try:
        valkey = start_valkey(home / "valkey", free_port(), password)
        started.append(valkey.pid)
        s3 = start_s3_server(home / "s3", free_port(), access_key, secret_key)
        started.append(s3.pid)
        model_dir = settings.model_dir if settings.model_dir.is_absolute() else (Path.cwd() / settings.model_dir)
        models = dict(settings.models)
        if settings.model_dir == FarmSettings().model_dir and not models:
            # Nothing configured: serve both tiny models, so `reelfarm run --image` works out of the box.
            models["i2v"] = model_dir.parent / "tiny-wan-i2v"
        farm = settings.model_copy(
            update={
                "redis_url": f"redis://:{password}@127.0.0.1:{valkey.port}/0",
                "secret": settings.secret or secrets.token_hex(32),
                "home": home,
                "model_dir": model_dir,
                "models": models,
                "s3": settings.s3.model_copy(
                    update={
                        "endpoint_url": f"http://127.0.0.1:{s3.port}",
                        "access_key": access_key,
                        "secret_key": secret_key,
                    }
                ),
                "spec_defaults": {**TINY_SPEC_DEFAULTS, **settings.spec_defaults},
                "http": settings.http.model_copy(
                    update={
                        "host": "127.0.0.1",
                        "port": free_port(),
                        "api_key_hashes": [*settings.http.api_key_hashes, api_key_hash(api_key)],
                    }
                ),
            }
        )
        if not (model_dir / "model_index.json").exists():
            build_tiny_model(model_dir, log_dir / "model.log")
        if "i2v" in models and not (models["i2v"] / "model_index.json").exists():
            build_tiny_model(models["i2v"], log_dir / "model.log", i2v=True)
        slots = plan_workers(farm.worker_layout(), sorted(os.sched_getaffinity(0)))
        procs = [start_worker(slot.stage, farm, log_dir, slot=slot) for slot in slots]
        started.extend(p.pid for p in procs)
        wait_for_workers(farm, list(Stage), procs, log_dir)
        http_front = start_http_front(farm, log_dir)
        started.append(http_front.pid)
    except BaseException:
        for pid in reversed(started):
            stop_pid(pid)
        raise
    _write_state(
        home,
        {
            "settings": json.loads(farm.model_dump_json()),
            "pids": {
                "valkey": valkey.pid,
                "s3": s3.pid,
                "http": http_front.pid,
                **{s.name: p.pid for s, p in zip(slots, procs, strict=True)},
            },
            # Only here, never in the settings: the key `reelfarm up` shows for the HTTP front.
            "api_key": api_key,
            "started_at": time.time(),
        },
    )
    return farm


def farm_down(home: Path) -> list[str]:
    """Stop the embedded farm: workers first (they finish their job), then the servers."""
    state = read_state(home.resolve())
    if state is None:
        return []
    pids: dict[str, int] = state["pids"]
    servers = ["http", "s3", "valkey"]
    # `expect` guards against a reused pid: only a process with that in its command line is signalled.
    expect = {"http": "scheduler.http", "s3": "weed", "valkey": "valkey"}
    # weed's filer ignores SIGTERM while it waits on subscribers; what it acknowledged is on disk already.
    timeouts = {"s3": S3_STOP_TIMEOUT}
    stopped: list[str] = []
    # Workers first (every key that is not a server: "transform-1", or "encode" from an older farm).
    for name in [n for n in pids if n not in servers] + [n for n in servers if n in pids]:
        stop_pid(pids[name], timeout=timeouts.get(name, 30.0), expect=expect.get(name, "workers"))
        stopped.append(name)
    state_path(home.resolve()).unlink()
    return stopped
