"""The event channel: one authenticated loopback connection per rank, to the notebook process.

It is ``multiprocessing.connection`` unchanged: the notebook listens on ``127.0.0.1`` on a port
the OS assigns, with a fresh 32-byte secret per launch; ``Listener``/``Client`` run an HMAC
challenge in both directions before anything else is exchanged, so only processes given the
secret can send the pickles this channel carries.
"""
from __future__ import annotations

import os
import socket
import threading
from multiprocessing.connection import Client, Connection, Listener
from typing import Optional, Tuple

from multiprocessing import AuthenticationError

Address = Tuple[str, int]

LOOPBACK = "127.0.0.1"


class EventListener:
    """The notebook's end of the channel. ``address`` and ``authkey`` are what ranks need."""

    def __init__(self, backlog: int = 64) -> None:
        self.authkey: bytes = os.urandom(32)
        self._listener = Listener((LOOPBACK, 0), family="AF_INET", backlog=backlog, authkey=self.authkey)
        self.address: Address = self._listener.address
        self._closed = threading.Event()
        self._waking = threading.Event()

    def accept(self) -> Optional[Connection]:
        """The next authenticated connection, or ``None`` once :meth:`wake` or :meth:`close` ran.

        Connections that fail the challenge (or hang up during it) are dropped and waiting goes on.
        """
        while not (self._waking.is_set() or self._closed.is_set()):
            try:
                connection = self._listener.accept()
            except (AuthenticationError, EOFError, OSError):
                continue
            if self._waking.is_set():
                connection.close()
                return None
            return without_delay(connection)
        return None

    def wake(self) -> None:
        """Make a blocked :meth:`accept` return ``None``: a bare connection that hangs up at once."""
        self._waking.set()
        try:
            socket.create_connection(self.address, timeout=1.0).close()
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening; the port is released."""
        if not self._closed.is_set():
            self._closed.set()
            self._listener.close()


def connect_to_notebook(address: Address, authkey: bytes) -> Connection:
    """The rank's end: connect to the notebook and pass the challenge (raises on a wrong key)."""
    return without_delay(Client(tuple(address), family="AF_INET", authkey=authkey))


def without_delay(connection: Connection) -> Connection:
    """Switch Nagle's algorithm off on ``connection``'s socket: events are small and come in
    bursts (output, then a result), and Nagle plus delayed ACKs would hold the second for ~40 ms."""
    sock = socket.socket(fileno=connection.fileno())
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    finally:
        sock.detach()
    return connection
