"""Which of this machine's addresses the nodes reach: the interface that routes to the first node.

The notebook's channel and rendezvous listen there and nowhere else (never on all interfaces).
A rank picks its own interface the same way, toward the notebook's address, for
``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional

import psutil


@dataclass(frozen=True)
class Interface:
    """A network interface of this machine and its IPv4 address."""

    name: str
    address: str

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def interface_named(name: str) -> Interface:
    """The interface ``name`` (``ValueError`` listing the interfaces there are, if none has that name)."""
    addresses = psutil.net_if_addrs()
    for entry in addresses.get(name, []):
        if entry.family == socket.AF_INET:
            return Interface(name, entry.address)
    known = ", ".join(f"{n} ({a.address})" for n, entries in sorted(addresses.items()) for a in entries
                      if a.family == socket.AF_INET)
    raise ValueError(f"interface={name!r}: this machine has no interface of that name with an IPv4 address;"
                     f" it has {known or 'none'}")


def interface_toward(host: str) -> Interface:
    """The interface this machine sends from to reach ``host`` (a name or an address).

    A UDP socket "connected" to the host asks the kernel's routing table; no packet is sent."""
    try:
        target = socket.gethostbyname(host)
    except OSError as error:
        raise ValueError(f"cannot resolve the node name {host!r} here ({error}): the notebook must reach the nodes by"
                         " name, or pass the interface that does: Slurm(interface='ib0')") from None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((target, 9))
        source = probe.getsockname()[0]
    except OSError as error:
        raise ValueError(f"no route from this machine to {host} ({target}): {error}") from None
    finally:
        probe.close()
    name = owner_of(source)
    if name is None:
        raise ValueError(f"the route to {host} ({target}) leaves from {source}, which no interface here holds")
    return Interface(name, source)


def owner_of(address: str) -> Optional[str]:
    """The name of the interface holding ``address``, if any."""
    for name, entries in psutil.net_if_addrs().items():
        if any(e.family == socket.AF_INET and e.address == address for e in entries):
            return name
    return None
