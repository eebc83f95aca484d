"""Hosts made of Linux network namespaces, for the multi-host test.

A private switch -- a bridge inside a namespace of its own -- and one namespace per
"host", joined to the switch by a veth pair and given an address of its own on
``SUBNET``. Nothing is created in, or changed on, the root namespace: every name
carries this run's tag (``rf<pid>``), and ``close`` deletes every namespace the lab
made (which takes its veths and the bridge with it), even after a failure.

The test process itself stays in the root namespace; ``host.run(fn, ...)`` calls
``fn`` on a thread that joined the host's network namespace (``setns`` is
per-thread), so sockets ``fn`` opens live on that host -- the test acts as the
submitter from its own host without a subprocess per Redis call.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

SUBNET = "10.213.77"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NamespacesUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no iproute2, no permission)."""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _join_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({name}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    _thread: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def launcher(self) -> list[str]:
        """The command prefix that runs a process on this host."""
        return ["ip", "netns", "exec", self.netns]

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on this host's network (one thread per host, so its connections stay here)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, f"netns-{self.name}", initializer=_join_netns, initargs=(self.netns,))
        return self._thread.submit(fn, *args, **kwargs).result()

    def cut(self) -> None:
        """Pull this host's cable: its only link goes down, so it reaches nothing and nothing reaches it."""
        ip("-n", self.netns, "link", "set", "eth0", "down")

    def heal(self) -> None:
        ip("-n", self.netns, "link", "set", "eth0", "up")


class NetnsLab:
    def __init__(self) -> None:
        self.tag = f"rf{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    def open(self) -> NetnsLab:
        if os.geteuid() != 0:
            raise NamespacesUnavailable("creating network namespaces needs root")
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("iproute2's `ip` is missing (scripts/setup.sh installs it)")
        try:
            self._add_netns(self.hub)
        except RuntimeError as exc:
            raise NamespacesUnavailable(str(exc)) from None
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        return self

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new host on the switch, with the next free address."""
        index = len(self.hosts) + 2
        netns = f"{self.tag}-{name}"
        self._add_netns(netns)
        port = f"p{index}"
        # Both ends are made where they belong: the switch port in the hub, eth0 in the host.
        ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        address = f"{SUBNET}.{index}"
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(name, netns, address)
        self.hosts[name] = host
        return host

    def host_of(self, address: str) -> Host:
        return next(h for h in self.hosts.values() if h.address == address)

    def close(self) -> None:
        for host in self.hosts.values():
            if host._thread is not None:
                host._thread.shutdown(wait=False, cancel_futures=True)
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()
