"""The fetch policy: how the farm reaches a URL on someone else's behalf (conditioning images, webhook targets).

Whoever names the URL chooses where the farm's own network position is used --
a cloud metadata service at 169.254.169.254, an admin port on loopback, a
database on a private range. That is server-side request forgery once anything
submits for remote clients. So a fetch, hop by hop:

1. accepts only ``http`` and ``https`` URLs with a host and no credentials;
2. resolves the host once and checks *every* address it resolves to: loopback,
   private, link-local, site-local (``fec0::/10``), shared (CGNAT), multicast,
   reserved and unspecified addresses -- also inside IPv4-mapped IPv6 and 6to4
   (``2002::/16``, which routes to the IPv4 address it embeds) -- are refused
   unless ``fetch.allow`` names the host or a CIDR range holding the address;
3. connects to the address it checked (never resolving again, so a DNS answer
   that changes between check and connect cannot move the request), with TLS
   verified against the host name;
4. follows at most ``max_redirects`` redirects, each ``Location`` checked from
   step 1 again;
5. stops at ``max_bytes`` (refused, not truncated) and at one deadline for the
   whole fetch, every hop and byte included: name resolution runs in a thread
   that is waited for only until the deadline, and a watchdog closes the socket
   at the deadline, so a server that sends its status line and headers one byte
   at a time (each within the socket timeout) cannot hold the fetch past it.

A refusal is a ``FetchRefused`` whose message is one line: the URL, the
reason, and what to do.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from scheduler.core.settings import FetchSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# Shared address space (RFC 6598, carrier-grade NAT): not private by Python's reckoning, not public either.
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class FetchRefused(ValueError):
    """A URL the farm will not fetch, or a fetch that failed; the message says why and what to do, in one line."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    # Host names (exact, case-insensitive) and CIDR ranges that may be fetched although not public.
    allow: tuple[str, ...] = ()
    max_redirects: int = 3
    timeout_seconds: float = 20.0

    def __post_init__(self) -> None:
        for entry in self.allow:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise FetchRefused(f"fetch.allow entry {entry!r} is not a CIDR range (e.g. 10.0.0.0/8)") from None

    @classmethod
    def from_settings(cls, settings: FetchSettings, max_bytes: int) -> FetchPolicy:
        """The policy ``FarmSettings.fetch`` describes, for bodies of at most ``max_bytes``."""
        return cls(max_bytes, tuple(settings.allow), settings.max_redirects, settings.timeout_seconds)

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in {e.lower().rstrip(".") for e in self.allow if "/" not in e}

    def allows_address(self, address: IPAddress) -> bool:
        for entry in self.allow:
            if "/" in entry or _is_literal(entry):
                network = ipaddress.ip_network(entry, strict=False)
                if address.version == network.version and address in network:
                    return True
        return False


def _is_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def address_class(address: IPAddress) -> str | None:
    """What kind of non-public address this is ("loopback", "private", ...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_class(address.ipv4_mapped)
    if isinstance(address, ipaddress.IPv6Address) and address.sixtofour is not None:
        # Python counts 2002::/16 as global, but a 6to4 relay delivers it to the embedded IPv4 address.
        embedded = address_class(address.sixtofour)
        return None if embedded is None else f"6to4 {embedded}"
    checks = [
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        # Deprecated (RFC 3879) but still routed inside some sites; Python counts it as global.
        ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("multicast", address.is_multicast),
        ("shared (CGNAT)", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        # Before "private": Python counts 240.0.0.0/4 as private too, but "reserved" is the truer word.
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("non-public", not address.is_global),
    ]
    return next((name for name, hit in checks if hit), None)


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order (a literal address resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str


def _resolve_by(resolver: Resolver, host: str, port: int, deadline: float, url: str, policy: FetchPolicy) -> list[str]:
    """``resolver(host, port)``, waited for until ``deadline``: a resolver that hangs (a slow or hostile DNS
    server) is left behind in its daemon thread, and the fetch is refused as too slow."""
    answer: list[Sequence[str]] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            answer.append(resolver(host, port))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            failure.append(exc)

    worker = threading.Thread(target=run, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(_remaining(deadline, url, policy))
    if worker.is_alive():
        raise _too_slow(url, policy)
    if failure:
        raise failure[0]
    return list(answer[0])


def _check_url(url: str, policy: FetchPolicy, resolver: Resolver, deadline: float) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(f"URL {url!r}: only http:// and https:// URLs are fetched")
    if not parts.hostname:
        raise FetchRefused(f"URL {url!r} has no host; write it as https://host/path")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused(f"URL {url!r} carries credentials; use a URL without user:password@")
    host = parts.hostname
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise FetchRefused(f"URL {url!r} has an invalid port") from None
    try:
        addresses = _resolve_by(resolver, host, port, deadline, url, policy)
    except (OSError, UnicodeError) as exc:
        raise FetchRefused(f"URL {url!r}: host {host} does not resolve ({_one_line(exc)}); check the URL") from None
    if not addresses:
        raise FetchRefused(f"URL {url!r}: host {host} resolves to no address; check the URL")
    host_allowed = policy.allows_host(host)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        kind = address_class(address)
        if kind is not None and not host_allowed and not policy.allows_address(address):
            shown = host if host == text else f"{host} ({text})"
            raise FetchRefused(
                f"URL {url!r}: {shown} is a {kind} address; the farm fetches only public addresses unless "
                "the fetch.allow setting names the host or its range"
            )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(scheme, host, port, path, addresses[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to the address the policy checked; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the address the policy checked; the certificate must match the host name (SNI)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _open(target: _Target, timeout: float, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(
            target.host, target.port, target.address, timeout, context or ssl.create_default_context()
        )
    return _PinnedHTTPConnection(target.host, target.port, target.address, timeout)


def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    resolver: Resolver = resolve,
    tls_context: ssl.SSLContext | None = None,
) -> bytes:
    """The body of ``url`` under ``policy``; raises ``FetchRefused`` with a one-line reason otherwise."""
    deadline = time.monotonic() + policy.timeout_seconds
    current = url
    for _hop in range(policy.max_redirects + 1):
        target = _check_url(current, policy, resolver, deadline)
        with _connection(target, deadline, url, policy, tls_context, "fetch") as conn:
            status, location, body = _request(conn, target, deadline, url, policy)
        if status in REDIRECT_STATUSES:
            if not location:
                raise FetchRefused(f"URL {url!r}: HTTP {status} redirect without a Location")
            current = urljoin(current, location)
            continue
        if status != 200:
            raise FetchRefused(f"URL {url!r}: the server answered HTTP {status}; check the URL")
        return body
    raise FetchRefused(f"URL {url!r}: more than {policy.max_redirects} redirects; link the final address instead")


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    policy: FetchPolicy,
    *,
    resolver: Resolver = resolve,
    tls_context: ssl.SSLContext | None = None,
) -> int:
    """POST ``body`` to ``url`` under ``policy`` (webhook deliveries); returns the HTTP status.

    Redirects are not followed (a receiver answers where it is configured: a 3xx is a failed delivery),
    and at most ``max_bytes`` of the answer are read, within the policy's deadline.
    """
    deadline = time.monotonic() + policy.timeout_seconds
    target = _check_url(url, policy, resolver, deadline)
    with _connection(target, deadline, url, policy, tls_context, "deliver to") as conn:
        conn.request("POST", target.path, body=body, headers={"User-Agent": "reelfarm-webhooks/1", **headers})
        response = conn.getresponse()
        response.read(policy.max_bytes)
        return response.status


@contextmanager
def _connection(
    target: _Target, deadline: float, url: str, policy: FetchPolicy, tls: ssl.SSLContext | None, verb: str
) -> Iterator[http.client.HTTPConnection]:
    """A connection to the checked address; its failures become one-line ``FetchRefused``s, and it is closed.

    A watchdog shuts the socket down at ``deadline``: socket timeouts bound each receive, not the sum of
    them, so without it a server answering its status line and headers a byte at a time is never cut off.
    """
    conn = _open(target, _remaining(deadline, url, policy), tls)
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut_down, (conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield conn
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
            raise _too_slow(url, policy) from None
        raise FetchRefused(f"URL {url!r}: cannot {verb} it ({_one_line(exc)})") from None
    finally:
        watchdog.cancel()
        conn.close()


def _shut_down(conn: http.client.HTTPConnection) -> None:
    """Wake whatever read is blocked on ``conn``'s socket: it returns end-of-stream or fails at once."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def _request(
    conn: http.client.HTTPConnection, target: _Target, deadline: float, url: str, policy: FetchPolicy
) -> tuple[int, str | None, bytes]:
    conn.request("GET", target.path, headers={"User-Agent": "reelfarm-fetch/1", "Accept-Encoding": "identity"})
    response = conn.getresponse()
    if response.status in REDIRECT_STATUSES:
        return response.status, response.getheader("Location"), b""
    if response.status != 200:
        return response.status, None, b""
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchRefused(_too_big(url, policy))
    chunks: list[bytes] = []
    size = 0
    while True:
        if conn.sock is not None:
            conn.sock.settimeout(_remaining(deadline, url, policy))
        # read1: at most one receive, so a server dribbling bytes cannot hold one call past the deadline.
        chunk = response.read1(_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchRefused(_too_big(url, policy))
        chunks.append(chunk)
        _remaining(deadline, url, policy)
    # The watchdog's shutdown ends a read as end-of-stream: a body cut off at the deadline is no body.
    _remaining(deadline, url, policy)
    return 200, None, b"".join(chunks)


def _remaining(deadline: float, url: str, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(url, policy)
    return left


def _too_slow(url: str, policy: FetchPolicy) -> FetchRefused:
    return FetchRefused(
        f"URL {url!r}: the fetch took longer than {policy.timeout_seconds:g} s; serve the file faster or upload it"
    )


def _too_big(url: str, policy: FetchPolicy) -> str:
    return f"URL {url!r}: the body is over the farm's limit of {policy.max_bytes:,} bytes; send a smaller file"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
