"""The fetch policy (issue 10): image URLs are fetched only from public addresses unless allowlisted.

A real HTTP server on loopback plays every server: allowlisted where a test
needs a fetch to succeed, not allowlisted where it must be refused. Refused
literal addresses are refused before any connection: ``socket.create_connection``
is watched, and the loopback server counts the connections it accepted.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import PIL.Image
import pytest

from scheduler.core.object_store import S3Config, get_bytes
from scheduler.core.settings import FarmSettings, FetchSettings, S3Settings
from scheduler.core.spec import JobSpec, SpecError
from scheduler.intake.fetch_policy import FetchPolicy, FetchRefused, address_class, fetch
from scheduler.intake.image_staging import stage_input_image


def png_bytes() -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = png_bytes()


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        self.hosts: list[str] = []

    def get_request(self) -> tuple[socket.socket, Any]:
        accepted = super().get_request()
        self.connections += 1
        return accepted

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    server: CountingServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.hosts.append(self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/redirect":
            self._redirect(query.removeprefix("to="))
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path == "/streamed-big":
            self.send_response(200)
            self.end_headers()  # no length: the body ends when the connection closes
            for _ in range(64):
                self.wfile.write(b"x" * 4096)
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server() -> Iterator[CountingServer]:
    srv = CountingServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address the fetch connects to, recorded before the real connect."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def watched(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        made.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", watched)
    return made


LOOPBACK_ALLOWED = FetchPolicy(max_bytes=100_000, allow=("127.0.0.0/8",), timeout_seconds=5)


def test_an_allowlisted_loopback_server_is_fetched(server: CountingServer, connections: list[Any]) -> None:
    assert fetch(f"http://127.0.0.1:{server.port}/img.png", LOOPBACK_ALLOWED) == PNG
    assert connections == [("127.0.0.1", server.port)]
    by_name = FetchPolicy(max_bytes=100_000, allow=("localhost",))
    assert fetch(f"http://localhost:{server.port}/img.png", by_name) == PNG


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("[fc00::1]", "private"),
        ("169.254.169.254", "link-local"),
        ("[fe80::1]", "link-local"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_non_public_addresses_are_refused_before_any_connection(
    server: CountingServer, connections: list[Any], host: str, kind: str
) -> None:
    policy = FetchPolicy(max_bytes=100_000)
    with pytest.raises(FetchRefused) as refused:
        fetch(f"http://{host}:{server.port}/img.png", policy)
    message = str(refused.value)
    assert f"is a {kind} address" in message and "fetch.allow" in message and "\n" not in message
    assert connections == [] and server.connections == 0


def test_every_resolved_address_must_pass(connections: list[Any]) -> None:
    # A name resolving to a public and a private address (split-horizon DNS, or a rebinding attempt).
    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.1.2.3"]

    with pytest.raises(FetchRefused, match=r"images\.example \(10\.1\.2\.3\) is a private address"):
        fetch("https://images.example/cat.png", FetchPolicy(max_bytes=1000), resolver=resolver)
    assert connections == []


def test_the_connection_goes_to_the_checked_address_with_the_host_header(
    server: CountingServer, connections: list[Any]
) -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    policy = FetchPolicy(max_bytes=100_000, allow=("127.0.0.1/32",))
    assert fetch(f"http://images.example:{server.port}/img.png", policy, resolver=resolver) == PNG
    assert calls == ["images.example"], "resolved exactly once"
    assert connections == [("127.0.0.1", server.port)]
    assert server.hosts == [f"images.example:{server.port}"]


def test_redirects_are_checked_hop_by_hop(server: CountingServer, connections: list[Any]) -> None:
    start = f"http://127.0.0.1:{server.port}/redirect?to=http://169.254.169.254/latest/meta-data/"
    with pytest.raises(FetchRefused, match="169.254.169.254 is a link-local address"):
        fetch(start, LOOPBACK_ALLOWED)
    assert connections == [("127.0.0.1", server.port)], "the metadata address was never connected to"
    # A redirect to an allowed address is followed.
    onward = f"http://127.0.0.1:{server.port}/redirect?to=/img.png"
    assert fetch(onward, LOOPBACK_ALLOWED) == PNG


def test_redirects_are_bounded(server: CountingServer) -> None:
    with pytest.raises(FetchRefused, match="more than 3 redirects"):
        fetch(f"http://127.0.0.1:{server.port}/loop", LOOPBACK_ALLOWED)
    assert server.connections == 4


@pytest.mark.parametrize("path", ["/declared-big", "/streamed-big"])
def test_bodies_over_the_byte_limit_are_refused(server: CountingServer, path: str) -> None:
    with pytest.raises(FetchRefused, match="over the farm's limit of 100,000 bytes"):
        fetch(f"http://127.0.0.1:{server.port}{path}", LOOPBACK_ALLOWED)


def test_a_slow_server_is_cut_off_at_the_deadline(server: CountingServer) -> None:
    policy = FetchPolicy(max_bytes=100_000, allow=("127.0.0.0/8",), timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="took longer than 1 s"):
        fetch(f"http://127.0.0.1:{server.port}/slow", policy)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/cat.png", "only http:// and https://"),
        ("http://user:pw@example.com/cat.png", "carries credentials"),
        ("http:///cat.png", "has no host"),
    ],
)
def test_urls_that_are_not_plain_http_are_refused(url: str, fragment: str, connections: list[Any]) -> None:
    with pytest.raises(FetchRefused, match=fragment):
        fetch(url, FetchPolicy(max_bytes=1000))
    assert connections == []


def test_http_errors_name_the_status(server: CountingServer) -> None:
    with pytest.raises(FetchRefused, match="answered HTTP 404"):
        fetch(f"http://127.0.0.1:{server.port}/missing.png", LOOPBACK_ALLOWED)


def test_a_bad_allow_entry_is_a_settings_error() -> None:
    with pytest.raises(FetchRefused, match="not a CIDR range"):
        FetchPolicy(max_bytes=1, allow=("10.0.0.0/99",))


def test_submission_refuses_a_private_image_url_naming_the_field(connections: list[Any]) -> None:
    settings = FarmSettings(secret="s")
    spec = JobSpec(prompt="a cat", image="http://169.254.169.254/latest/meta-data/iam")
    with pytest.raises(SpecError) as refused:
        stage_input_image(settings, spec, "j1", client=None)
    message = str(refused.value)
    assert message.startswith("invalid job spec: image: URL") and "link-local" in message and "\n" not in message
    assert connections == []


def test_submission_fetches_from_an_allowlisted_server(
    server: CountingServer, s3_config: S3Config, s3_client: Any
) -> None:
    settings = FarmSettings(
        secret="s", s3=S3Settings(bucket=s3_config.bucket), fetch=FetchSettings(allow=["127.0.0.1/32"])
    )
    spec = JobSpec(prompt="a cat", image=f"http://127.0.0.1:{server.port}/img.png")
    staged = stage_input_image(settings, spec, "j1", s3_client)
    assert staged.image is not None
    bucket, _, key = staged.image.removeprefix("s3://").partition("/")
    assert get_bytes(s3_client, bucket, key) == PNG


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("[2002:7f00:1::1]", "6to4 loopback"),  # 2002:7f00:0001:: embeds 127.0.0.1
        ("[2002:a00:1::]", "6to4 private"),  # 10.0.0.1
        ("[2002:a9fe:a9fe::]", "6to4 link-local"),  # 169.254.169.254, the metadata service
        ("[fec0::1]", "site-local"),
    ],
)
def test_6to4_of_non_public_ipv4_and_site_local_are_refused(
    server: CountingServer, connections: list[Any], host: str, kind: str
) -> None:
    with pytest.raises(FetchRefused) as refused:
        fetch(f"http://{host}:{server.port}/img.png", FetchPolicy(max_bytes=100_000))
    assert f"is a {kind} address" in str(refused.value) and connections == []


def test_6to4_of_a_public_ipv4_is_public() -> None:
    assert address_class(ipaddress.ip_address("2002:808:808::1")) is None  # 8.8.8.8


def test_the_deadline_bounds_name_resolution(connections: list[Any]) -> None:
    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(30)  # a DNS server that never answers
        return ["93.184.216.34"]

    started = time.monotonic()
    try:
        with pytest.raises(FetchRefused, match="took longer than 0.5 s"):
            fetch("https://images.example/cat.png", FetchPolicy(max_bytes=1000, timeout_seconds=0.5), resolver=hanging)
    finally:
        release.set()
    assert time.monotonic() - started < 2.0 and connections == []


def test_a_server_dribbling_its_headers_is_cut_off_at_the_deadline() -> None:
    """Each byte arrives well within a socket timeout, so only the watchdog can stop it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def dribble() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 200:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    policy = FetchPolicy(max_bytes=100_000, allow=("127.0.0.0/8",), timeout_seconds=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(FetchRefused, match="took longer than 1 s"):
            fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/img.png", policy)
        assert time.monotonic() - started < 2.5
    finally:
        stop.set()
        listener.close()
