"""The one door to the Mooncake transfer engine: every ``mooncake`` import in reelfarm is in this file.

``MooncakeEngine`` owns one ``mooncake.engine.TransferEngine`` for the life of a
worker process and exposes the few calls the hand-off needs, with Mooncake's
integer return codes turned into ``TransferError``.

Lifecycle (one per worker process):

1. ``MooncakeEngine(...)`` initialises the engine; it starts listening at once.
   ``endpoint`` ("host:rpc_port") is what the worker registers with its live
   worker record; a consumer passes it as ``peer_endpoint``.
2. ``register`` the worker's slot pool ONCE (``SlotPool`` does this). A producer's
   engine serves reads only inside registered memory; anything else is refused
   by the producer's server, and surfaces here as a ``TransferError``.
3. Consumers ``read`` / ``batch_read`` from a producer's registered memory into
   their own registered memory (pull). Reads are synchronous and release the GIL.
   The destination must lie inside memory registered with *this* wrapper, or
   inside a ``private_destination`` the caller opened for the read: it is
   checked here, because Mooncake's TCP transport does not check it.
4. ``close`` unregisters what this wrapper registered and drops the engine.

Private destinations (TCP only). RDMA can only write into registered memory, but
Mooncake's TCP transport receives into any local address. Registered memory is
served to every peer that connects -- for reads *and writes* -- so bytes a
consumer verified in its registered receive slot could still change before it
uses them. A read into private memory (never registered, never served) avoids
both that window and the copy out of the slot. The engine turns the feature on
only after a self-test read into private memory at start-up succeeds
(``reads_into_private_memory``); otherwise, and on RDMA, consumers use a
registered receive slot and copy out of it.

Settings Mooncake reads from environment variables. The constructor sets the
ones it is given for the duration of engine construction only, so they do not
leak into other engines built later in the process:

- ``transfer_timeout_s`` -> ``MC_TRANSFER_TIMEOUT`` (seconds; Mooncake's default
  30, values below 5 are raised to 5). Read per ``TransferEngine`` object. A sync
  read gives up after this many seconds plus one second per GiB requested and
  returns -1.
- ``connect_timeout_s`` -> ``MC_HANDSHAKE_CONNECT_TIMEOUT`` (seconds, default 5):
  connect timeout of the handshake/metadata RPC to a peer; and ``log_level`` ->
  ``MC_LOG_LEVEL`` (INFO, WARNING or ERROR; Mooncake logs to stderr, INFO by
  default). Both belong to Mooncake's global config, which it reads ONCE per
  process, when ``mooncake.engine`` is first imported: they only take effect
  when given to the first engine of the process (later ones log a warning).

Other knobs present in the 0.3.13 wheel (defaults from Mooncake's source; set
them in the environment if needed):
``MC_TCP_STATUS_TIMEOUT_SEC`` (TCP status-frame deadline, default 30),
``MC_TCP_ADMISSION_TIMEOUT_MS`` (wait for a free TCP lane, default 1000),
``MC_TCP_LANES_PER_PEER`` (default 4), ``MC_TCP_ENABLE_CONNECTION_POOL``,
``MC_TCP_PROGRESS_TIMEOUT_SEC``, ``MC_SLICE_TIMEOUT``, ``MC_MIN_RPC_PORT``/``MC_MAX_RPC_PORT`` (the range the
endpoint's port is drawn from, default 15000-17000), ``MC_TCP_BIND_ADDRESS``.

Stale-connection retry. Mooncake's TCP transport keeps its connections to a
peer open between transfers and reuses them. If such an idle connection was
closed under it (dropped by the peer's side, reaped by a middlebox or a
keepalive), the next transfer fails at once -- the "first transfer after an idle gap
fails" reports, kvcache-ai/Mooncake#4209, fix pending in #4234 -- and the one
after that reconnects and succeeds. A read is idempotent (it only overwrites
our own receive slot), so a read that fails *quickly* is retried, at most
``read_attempts`` times in all, with a short growing backoff. A read that failed
by running into the transfer timeout is not retried: the peer is dead or
wedged, and retrying would only multiply the wait before the consumer reports
the room lost. A dead peer (connection refused) costs about 1 s over all
attempts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "mooncake-transfer-engine is not installed: pip install mooncake-transfer-engine-non-cuda "
    "(and apt-get install libibverbs1)"
)

# Mooncake's own defaults, mirrored so the retry policy can tell a timeout from a fast failure.
_DEFAULT_TRANSFER_TIMEOUT_S = 30
_MIN_TRANSFER_TIMEOUT_S = 5
# Read once per process, when mooncake.engine is first imported; the rest are read per engine.
_GLOBAL_CONFIG_VARS = ("MC_HANDSHAKE_CONNECT_TIMEOUT", "MC_LOG_LEVEL")


class TransferError(RuntimeError):
    """A Mooncake call failed; the message says which call, against which peer, and what to check."""


class MooncakeEngine:
    """One Mooncake transfer engine for this process (see the module docstring for the lifecycle)."""

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        protocol: str = "tcp",
        device_name: str = "",
        metadata_server: str = "P2PHANDSHAKE",
        *,
        transfer_timeout_s: int | None = None,
        connect_timeout_s: int | None = None,
        log_level: str | None = None,
        read_attempts: int = 3,
        retry_backoff_s: float = 0.1,
        private_destinations: bool = True,
    ) -> None:
        if read_attempts < 1:
            raise ValueError(f"read_attempts must be at least 1, got {read_attempts}")
        overrides = {
            "MC_TRANSFER_TIMEOUT": transfer_timeout_s,
            "MC_HANDSHAKE_CONNECT_TIMEOUT": connect_timeout_s,
            "MC_LOG_LEVEL": log_level,
        }
        process_wide = [k for k in _GLOBAL_CONFIG_VARS if overrides[k] is not None]
        if process_wide and "mooncake.engine" in sys.modules:
            logger.warning(
                "%s ignored: Mooncake read its global config when it was first imported in this process; "
                "set them in the environment before the first engine",
                ", ".join(process_wide),
            )
        with _environment({k: str(v) for k, v in overrides.items() if v is not None}):
            try:
                # Mooncake loads its global config (log level, connect timeout) when the module loads.
                from mooncake.engine import TransferEngine
            except ImportError as exc:
                raise TransferError(f"{_INSTALL_HINT} ({exc})") from exc
            self._transfer_timeout_s = _effective_transfer_timeout(os.environ.get("MC_TRANSFER_TIMEOUT"))
            engine = TransferEngine()
            rc = engine.initialize(hostname, metadata_server, protocol, device_name)
        if rc != 0:
            raise TransferError(
                f"Mooncake TransferEngine.initialize(hostname={hostname!r}, metadata_server={metadata_server!r}, "
                f"protocol={protocol!r}, device_name={device_name!r}) returned {rc}; check the hostname is "
                "an address of this machine and, for rdma, that the device exists"
            )
        self._engine: Any = engine
        self._hostname = hostname
        self._protocol = protocol
        self._endpoint = f"{hostname}:{engine.get_rpc_port()}"
        self._read_attempts = read_attempts
        self._retry_backoff_s = retry_backoff_s
        self._registered: dict[int, int] = {}
        self._private: dict[int, int] = {}
        self._lock = threading.Lock()
        self._reads_into_private = protocol == "tcp" and private_destinations and self._private_read_works()

    # -- identity -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The session id a peer passes to reach this engine: "host:rpc_port"."""
        return self._endpoint

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def transfer_timeout_s(self) -> int:
        """The per-read timeout this engine runs with (before Mooncake's 1 s/GiB allowance)."""
        return self._transfer_timeout_s

    @property
    def reads_into_private_memory(self) -> bool:
        """Whether reads may land in private memory (see ``private_destination``)."""
        return self._reads_into_private

    @property
    def closed(self) -> bool:
        return self._engine is None

    # -- memory registration --------------------------------------------------------

    def register(self, ptr: int, nbytes: int) -> None:
        """Make ``[ptr, ptr + nbytes)`` readable by peers and usable as a read destination."""
        if nbytes <= 0:
            raise ValueError(f"cannot register {nbytes} bytes")
        engine = self._live()
        with self._lock:
            if ptr in self._registered:
                raise TransferError(f"memory at {ptr:#x} is already registered with this engine")
            rc = engine.register_memory(ptr, nbytes)
            if rc != 0:
                raise TransferError(f"Mooncake register_memory({ptr:#x}, {nbytes}) returned {rc}")
            self._registered[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        """Stop serving the buffer registered at ``ptr``; unknown pointers are refused.

        After ``close`` this is a no-op: close already unregistered everything, and a
        pool closed after its engine must not fail on the way down.
        """
        if self._engine is None:
            return
        engine = self._engine
        with self._lock:
            if ptr not in self._registered:
                raise TransferError(f"memory at {ptr:#x} was not registered with this engine")
            rc = engine.unregister_memory(ptr)
            del self._registered[ptr]
        if rc != 0:
            raise TransferError(f"Mooncake unregister_memory({ptr:#x}) returned {rc}")

    # -- reads (pull) ---------------------------------------------------------------

    def read(self, peer_endpoint: str, local_ptr: int, remote_ptr: int, nbytes: int) -> None:
        """Copy ``nbytes`` from the peer's registered memory at ``remote_ptr`` into ours at ``local_ptr``."""
        if nbytes <= 0:
            raise ValueError(f"cannot read {nbytes} bytes")
        engine = self._live()
        self._check_local(local_ptr, nbytes)
        self._with_retry(
            lambda: engine.transfer_sync_read(peer_endpoint, local_ptr, remote_ptr, nbytes),
            what=f"read of {nbytes} bytes at {remote_ptr:#x} from {peer_endpoint}",
        )

    def batch_read(
        self,
        peer_endpoint: str,
        local_ptrs: Sequence[int],
        remote_ptrs: Sequence[int],
        lengths: Sequence[int],
    ) -> None:
        """Several reads from one peer in one Mooncake batch; all succeed or a ``TransferError`` is raised."""
        if not (len(local_ptrs) == len(remote_ptrs) == len(lengths)):
            raise ValueError(
                f"batch_read needs equal-length lists, got {len(local_ptrs)}, {len(remote_ptrs)}, {len(lengths)}"
            )
        if not lengths:
            return
        if any(n <= 0 for n in lengths):
            raise ValueError("batch_read lengths must all be positive")
        engine = self._live()
        local, remote, sizes = list(local_ptrs), list(remote_ptrs), list(lengths)
        for ptr, nbytes in zip(local, sizes, strict=True):
            self._check_local(ptr, nbytes)
        self._with_retry(
            lambda: engine.batch_transfer_sync_read(peer_endpoint, local, remote, sizes),
            what=f"batch read of {len(sizes)} spans ({sum(sizes)} bytes) from {peer_endpoint}",
        )

    @contextmanager
    def private_destination(self, ptr: int, nbytes: int) -> Iterator[None]:
        """Allow reads into ``[ptr, ptr + nbytes)`` of private memory while the block runs.

        The range is never registered, so no peer can read or write it; only this
        process's own reads land there. Refused unless ``reads_into_private_memory``.
        """
        if not self._reads_into_private:
            raise TransferError(
                f"this engine ({self._protocol}) cannot read into private memory: use a registered receive slot"
            )
        if nbytes <= 0:
            raise ValueError(f"a private destination needs a positive size, got {nbytes}")
        with self._lock:
            if ptr in self._private:
                raise TransferError(f"private destination {ptr:#x} is already open")
            self._private[ptr] = nbytes
        try:
            yield
        finally:
            with self._lock:
                del self._private[ptr]

    def close(self) -> None:
        """Unregister everything this wrapper registered and release the engine; idempotent."""
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        with self._lock:
            for ptr in list(self._registered):
                rc = engine.unregister_memory(ptr)
                if rc != 0:
                    logger.warning("Mooncake unregister_memory(%#x) returned %s during close", ptr, rc)
            self._registered.clear()
        # The C++ destructor stops the listener and frees the engine's resources.
        del engine

    def __enter__(self) -> MooncakeEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _live(self) -> Any:
        if self._engine is None:
            raise TransferError("the Mooncake engine is closed")
        return self._engine

    def _check_local(self, ptr: int, nbytes: int) -> None:
        # Mooncake checks the *remote* range against the peer's registrations, but its TCP transport
        # writes to any local address it is given: an unchecked destination is a buffer overrun.
        with self._lock:
            for ranges in (self._registered, self._private):
                if any(base <= ptr and ptr + nbytes <= base + size for base, size in ranges.items()):
                    return
        raise TransferError(
            f"read destination {ptr:#x}..+{nbytes} is not inside memory registered with this engine "
            "or an open private destination (a payload larger than the receive buffer?)"
        )

    def _private_read_works(self) -> bool:
        """Self-test: read a registered pattern from our own endpoint into private memory and compare."""
        size = 4096
        source = ctypes.create_string_buffer(bytes(i % 251 for i in range(size)), size)
        landing = ctypes.create_string_buffer(size)
        source_ptr, landing_ptr = ctypes.addressof(source), ctypes.addressof(landing)
        engine = self._engine
        if engine.register_memory(source_ptr, size) != 0:
            logger.info("private-destination self-test could not register its source; using receive slots")
            return False
        try:
            rc = engine.transfer_sync_read(self._endpoint, landing_ptr, source_ptr, size)
        finally:
            engine.unregister_memory(source_ptr)
        works = rc == 0 and landing.raw == source.raw
        if not works:
            logger.info("Mooncake cannot read into private memory here (rc %s); using receive slots", rc)
        return works

    def _with_retry(self, call: Callable[[], int], what: str) -> None:
        rc = 0
        for attempt in range(1, self._read_attempts + 1):
            started = time.monotonic()
            rc = call()
            if rc == 0:
                if attempt > 1:
                    logger.info("%s succeeded on attempt %d", what, attempt)
                return
            elapsed = time.monotonic() - started
            if elapsed >= self._transfer_timeout_s:
                raise TransferError(
                    f"{what} timed out after {elapsed:.1f} s (Mooncake returned {rc}); the producer is "
                    "unresponsive or gone -- report the room lost (MC_TRANSFER_TIMEOUT sets the limit)"
                )
            if attempt < self._read_attempts:
                logger.warning(
                    "%s failed (Mooncake returned %s after %.3f s), retrying (attempt %d of %d)",
                    what,
                    rc,
                    elapsed,
                    attempt + 1,
                    self._read_attempts,
                )
                time.sleep(self._retry_backoff_s * (4 ** (attempt - 1)))
        raise TransferError(
            f"{what} failed {self._read_attempts} times (Mooncake returned {rc}); check the producer is "
            "alive at that endpoint and the range lies inside its registered pool (Mooncake's log on "
            "stderr says which)"
        )


def _effective_transfer_timeout(raw: str | None) -> int:
    """What Mooncake will use: the env value parsed like C's atoi, floored at 5 s, else the 30 s default."""
    if raw is None:
        return _DEFAULT_TRANSFER_TIMEOUT_S
    match = re.match(r"\s*[+-]?\d+", raw)
    return max(_MIN_TRANSFER_TIMEOUT_S, int(match.group()) if match else 0)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then put the old values back."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
