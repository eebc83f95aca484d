"""Local server processes: ports, spawning, readiness, logs and stopping -- for Valkey and SeaweedFS alike.

Rules every server here follows:

- it binds 127.0.0.1 only;
- secrets (the Redis password, the S3 keys) go into 0600 files inside the
  server's data dir (``write_private``), never onto a command line, which ``ps``
  shows to every user;
- start-up is not done until a real client call succeeds (``wait_ready``), and a
  server that fails to come up is stopped again and reported with its log tail;
- it can be stopped from another process by pid (``stop_pid``), for ``reelfarm down``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"

DEFAULT_STOP_TIMEOUT = 10.0

# How often a port chosen here may turn out taken (another process grabbed it
# between our probe and the server's bind) before we give up.
PORT_ATTEMPTS = 3
POLL_INTERVAL = 0.05


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
            stop_child(self.process, grace)
        else:
            stop_pid(self.pid, grace)
        for path in self.cleanup_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

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
        time.sleep(POLL_INTERVAL)
    return True


def stop_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
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


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def one_line_tail(path: Path, lines: int = 5) -> str:
    # Error messages stay one line; the full log is named next to it.
    tail = " | ".join(line.strip()[:300] for line in log_tail(path, lines).splitlines() if line.strip())
    return tail or "(log is empty)"


def write_private(path: Path, text: str) -> Path:
    """Write a file only the owner can read (it holds a secret), atomically: readers never see half of it.

    The one writer of secret-holding files: server configs, the embedded farm's state, worker settings.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    tmp.replace(path)
    return path


def spawn(
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


class PortTaken(Exception):
    """The server exited because a port we chose was grabbed first; retry with new ports."""


def wait_ready(
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
            if "address already in use" in log_since(server.log_path, log_mark).lower():
                raise PortTaken()
            raise LocalServerError(
                f"{server.name} exited with status {code} during start-up: "
                f"{one_line_tail(server.log_path)} (full log: {server.log_path})"
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
                f"{one_line_tail(server.log_path)} (full log: {server.log_path})"
            )
        time.sleep(POLL_INTERVAL)


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, mark: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(mark)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- Valkey / Redis
