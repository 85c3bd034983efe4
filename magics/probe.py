"""The first task of a new pool: learn each rank's device, and switch off Nagle on the event channel.

The event channel is TCP over loopback. With Nagle's algorithm on, a rank that sends two small
messages back to back (an output chunk, then the task's result) has the second one held until the
notebook acknowledges the first, and loopback acknowledgements are delayed by up to 40 ms: a cell
that prints would take 40 ms more than one that does not. Setting ``TCP_NODELAY`` on both ends
removes that; :func:`set_nodelay_in_notebook` does the notebook's end, :class:`PoolProbe` (run in
every rank) the rank's end. Both leave sockets alone that already have it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable


def _set_nodelay(fd: int, wanted_ports: FrozenSet[int] = frozenset()) -> bool:
    """Set ``TCP_NODELAY`` on the TCP socket ``fd`` (only if bound to one of ``wanted_ports``, when given)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return False
        if wanted_ports and sock.getsockname()[1] not in wanted_ports:
            return False
        if not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def set_nodelay_in_notebook(connections: Iterable[Any]) -> FrozenSet[int]:
    """Set ``TCP_NODELAY`` on the notebook's ends; return the ranks' ports (their ends' local ports)."""
    ports = set()
    for connection in connections:
        if connection is None:
            continue
        try:
            fd = connection.fileno()
            _set_nodelay(fd)
            with socket.socket(fileno=os.dup(fd)) as sock:
                ports.add(sock.getpeername()[1])
        except (OSError, ValueError):
            continue
    return frozenset(ports)


@dataclass(frozen=True)
class PoolProbe:
    """Task: set ``TCP_NODELAY`` on the rank's end of the event channel; report pid and device."""

    channel_ports: FrozenSet[int]

    def __call__(self, fabric: Any, namespace: Dict[str, Any]) -> Dict[str, Any]:
        done = 0
        if self.channel_ports:
            for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
                if name.isdigit() and _set_nodelay(int(name), self.channel_ports):
                    done += 1
        return {"pid": os.getpid(), "device": str(fabric.device), "nodelay": done}
