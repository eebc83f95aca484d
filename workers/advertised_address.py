"""The address a worker advertises to its peers, checked before the worker registers it.

Consumers connect to the transfer endpoint a producer registered; a worker that
advertises an address that is not its own (a copied config, a stale pod IP, a
typo) would register fine and then fail every hand-off on another host, one
timeout at a time. So at start a worker checks that ``transfer.hostname``
resolves to an address one of its interfaces holds -- binding a socket to it is
the kernel's own answer -- and refuses to start otherwise. Behind a NAT or a
port forward the advertised address is legitimately foreign:
``transfer.allow_nat_hostname`` lets the worker start, with a warning.
"""

from __future__ import annotations

import ipaddress
import socket

from scheduler.core.errors import UserError


class AdvertisedAddressError(UserError, ValueError):
    """The advertised transfer address cannot work; the message says how to fix it."""


def resolve(hostname: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise AdvertisedAddressError(
            f"transfer hostname {hostname!r} does not resolve ({exc}): set REELFARM_TRANSFER_HOSTNAME "
            "to an address of this host that the other workers can reach"
        ) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_local_address(address: str) -> bool:
    """True when an interface of this host (this network namespace) holds ``address``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def check_advertised_address(hostname: str, allow_nat: bool = False) -> str | None:
    """Raise ``AdvertisedAddressError`` unless ``hostname`` is this host's; a warning line when NAT allows it."""
    addresses = resolve(hostname)
    unspecified = [a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_unspecified]
    if unspecified:
        raise AdvertisedAddressError(
            f"transfer hostname {hostname!r} is the wildcard address, which peers cannot connect to: "
            "set REELFARM_TRANSFER_HOSTNAME to this host's own reachable address (e.g. the pod IP)"
        )
    if any(is_local_address(a) for a in addresses):
        return None
    shown = hostname if addresses == [hostname] else f"{hostname} ({', '.join(addresses)})"
    if allow_nat:
        return (
            f"transfer hostname {shown} is not an address of this host; advertising it anyway "
            "(transfer.allow_nat_hostname): the NAT must forward the transfer port to this worker"
        )
    raise AdvertisedAddressError(
        f"transfer hostname {shown} is not an address of this host, so other workers could not pull from it: "
        "set REELFARM_TRANSFER_HOSTNAME to one of this host's addresses, or REELFARM_TRANSFER_ALLOW_NAT=1 "
        "if a NAT forwards it here"
    )
