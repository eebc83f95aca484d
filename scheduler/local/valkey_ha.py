"""An embedded high-availability Valkey on loopback: one primary, one replica and three Sentinels.

What a managed Redis with failover looks like, small enough for tests and a laptop:

1. start the primary (AOF on, password, as the embedded farm's) and a replica of it,
2. wait until the replica is in sync,
3. start three Sentinels watching the primary (quorum 2, down after ``down_after_ms``),
4. wait until every Sentinel knows the replica and the two other Sentinels -- only then can they fail over.

The farm connects with ``url`` (``redis+sentinel://``); killing the primary makes the Sentinels promote
the replica within a few seconds, and the farm's clients reconnect to it (``scheduler.core.connection``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis

from scheduler.local.processes import LOOPBACK, LocalServerError, ManagedServer
from scheduler.local.valkey import SentinelWatch, replica_config, start_valkey

SENTINELS = 3
READY_TIMEOUT_SECONDS = 30.0


@dataclass
class HaValkey:
    primary: ManagedServer
    replica: ManagedServer
    sentinels: list[ManagedServer]
    password: str
    master_name: str
    # Every server started, in start order: what ``stop`` stops.
    started: list[ManagedServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{self.password}@{hosts}/{self.master_name}/0"

    def primary_port_now(self) -> int:
        """The port of the server the Sentinels call primary at this moment."""
        for sentinel in self.sentinels:
            try:
                client = redis.Redis(host=LOOPBACK, port=sentinel.port, password=self.password, socket_timeout=1.0)
                address: tuple[str, int] = client.sentinel_get_master_addr_by_name(self.master_name)  # type: ignore[assignment]
                return int(address[1])
            except redis.RedisError:
                continue
        raise LocalServerError("no Sentinel answered where the primary is")

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop(5.0)


def start_ha_valkey(
    base_dir: Path, password: str, master_name: str = "reelfarm", down_after_ms: int = 1000
) -> HaValkey:
    """Start the primary, the replica and the Sentinels under ``base_dir``; returns once a failover could happen."""
    started: list[ManagedServer] = []
    try:
        primary = start_valkey(base_dir / "primary", None, password)
        started.append(primary)
        replica = start_valkey(
            base_dir / "replica", None, password, extra_config=replica_config(LOOPBACK, primary.port, password)
        )
        started.append(replica)
        _wait(lambda: _replica_in_sync(replica.port, password), "the replica to sync with the primary")
        watch = SentinelWatch(master_name, LOOPBACK, primary.port, quorum=2, down_after_ms=down_after_ms)
        sentinels = []
        for index in range(SENTINELS):
            sentinel = start_valkey(base_dir / f"sentinel-{index}", None, password, sentinel_of=watch)
            started.append(sentinel)
            sentinels.append(sentinel)
        for sentinel in sentinels:
            _wait(partial(_sentinel_ready, sentinel.port, password, master_name), "the Sentinels to meet")
    except BaseException:
        for server in reversed(started):
            server.stop(5.0)
        raise
    return HaValkey(primary, replica, sentinels, password, master_name, started)


def _replica_in_sync(port: int, password: str) -> bool:
    info = redis.Redis(host=LOOPBACK, port=port, password=password, socket_timeout=1.0).info("replication")
    return info.get("master_link_status") == "up"


def _sentinel_ready(port: int, password: str, master_name: str) -> bool:
    """The Sentinel on ``port`` knows the replica and the other Sentinels (hello messages take a few seconds)."""
    client = redis.Redis(host=LOOPBACK, port=port, password=password, socket_timeout=1.0)
    master: dict[str, object] = client.sentinel_master(master_name)  # type: ignore[assignment]
    return (
        int(str(master.get("num-slaves", 0))) >= 1 and int(str(master.get("num-other-sentinels", 0))) >= SENTINELS - 1
    )


def _wait(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)
    raise LocalServerError(f"timed out after {READY_TIMEOUT_SECONDS:.0f}s waiting for {what}")
