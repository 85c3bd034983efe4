"""The event channel: one authenticated loopback connection per rank, to the notebook process.

It is ``multiprocessing.connection``'s wire format and HMAC challenge (``deliver_challenge`` /
``answer_challenge``, in both directions, before anything else is exchanged) with a fresh 32-byte
secret per launch, on ``127.0.0.1`` and a port the OS assigns, so only processes given the secret
can send the pickles this channel carries: nothing is unpickled before a peer proved it holds
the key.

What the standard ``Listener`` lacks is protection against the rest of the machine: its
``accept()`` runs the challenge inline and without a deadline, so one local connection that sends
nothing would block every rank behind it. Here the door (a thread) only accepts sockets; each
challenge runs in a thread of its own and is hung up after ``handshake_timeout`` seconds, so a
silent, wrong-keyed or half-finished connection costs the ranks nothing.

The door opens with :meth:`EventListener.start`, once the ranks are started: a rank forked while a
challenge runs in another thread of the notebook could inherit a lock that thread holds (OpenSSL's,
under the HMAC) and hang in its own challenge. Connections made before wait in the backlog.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from typing import Dict, Optional, Tuple

Address = Tuple[str, int]

LOOPBACK = "127.0.0.1"
#: seconds a connection gets to pass the challenge before it is hung up
HANDSHAKE_TIMEOUT = 10.0
_DOOR_TICK = 0.2  # seconds between the door's checks of handshake deadlines


class EventListener:
    """The notebook's end of the channel. ``address`` and ``authkey`` are what ranks need.

    ``refused`` counts connections that failed the challenge, hung up during it or ran out of time.
    """

    def __init__(self, backlog: int = 64, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.authkey: bytes = os.urandom(32)
        self.handshake_timeout = handshake_timeout
        self.refused = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._socket.bind((LOOPBACK, 0))
            self._socket.listen(backlog)
            self._socket.settimeout(_DOOR_TICK)
        except BaseException:
            self._socket.close()
            raise
        self.address: Address = self._socket.getsockname()[:2]
        self.listening_fd: int = self._socket.fileno()  # a forked rank closes its inherited copy
        self._admitted: "queue.Queue[Optional[Connection]]" = queue.Queue()
        self._closed = threading.Event()
        self._waking = threading.Event()
        self._lock = threading.Lock()
        self._handshakes: Dict[Connection, float] = {}  # connection in its challenge -> deadline
        self._door = threading.Thread(target=self._door_loop, name="notebook-fabric door", daemon=True)

    def start(self) -> "EventListener":
        """Open the door: accept connections and run their challenges (call it after forking the ranks)."""
        if not self._door.is_alive() and not self._closed.is_set():
            self._door.start()
        return self

    def accept(self) -> Optional[Connection]:
        """The next authenticated connection, or ``None`` once :meth:`wake` or :meth:`close` ran.

        Connections are admitted only after :meth:`start`."""
        if self._waking.is_set() or self._closed.is_set():
            return None
        connection = self._admitted.get()
        if connection is not None and (self._waking.is_set() or self._closed.is_set()):
            connection.close()
            return None
        return connection

    def wake(self) -> None:
        """Make a blocked :meth:`accept` return ``None`` (and every later one)."""
        self._waking.set()
        self._admitted.put(None)

    def close(self) -> None:
        """Stop listening (the port is released), hang up challenges still running."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._admitted.put(None)
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the door's accept() at once
        except OSError:
            pass
        if self._door.is_alive():
            self._door.join(timeout=2 * _DOOR_TICK + 1.0)
        self._socket.close()
        with self._lock:
            pending = list(self._handshakes)
        for connection in pending:
            self._hang_up(connection)
        while True:  # admitted after the last accept(): nobody will read them
            try:
                connection = self._admitted.get_nowait()
            except queue.Empty:
                break
            if connection is not None:
                connection.close()

    # -- the door and the challenges ------------------------------------------------------------
    def _door_loop(self) -> None:
        while not self._closed.is_set():
            self._expire_handshakes()
            try:
                sock, _ = self._socket.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(_DOOR_TICK)  # e.g. out of file descriptors: do not spin
                continue
            sock.setblocking(True)
            connection = Connection(sock.detach())
            with self._lock:
                self._handshakes[connection] = time.monotonic() + self.handshake_timeout
            threading.Thread(target=self._challenge, args=(connection,), name="notebook-fabric handshake",
                             daemon=True).start()

    def _challenge(self, connection: Connection) -> None:
        try:
            deliver_challenge(connection, self.authkey)
            answer_challenge(connection, self.authkey)
            passed = True
        except (AuthenticationError, EOFError, OSError, ValueError):
            passed = False
        with self._lock:
            timed_out = self._handshakes.pop(connection, None) is None
            if not passed or timed_out or self._closed.is_set():
                if not self._closed.is_set():
                    self.refused += 1
                connection.close()
                return
        self._admitted.put(without_delay(connection))

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [c for c, deadline in self._handshakes.items() if deadline <= now]
        for connection in expired:
            self._hang_up(connection)

    def _hang_up(self, connection: Connection) -> None:
        """End a challenge in progress: its blocked read returns end-of-file, its thread closes it."""
        with self._lock:
            if self._handshakes.pop(connection, None) is None:
                return  # finished meanwhile; its thread owns the descriptor
            if connection.closed:
                return
            sock = socket.socket(fileno=connection.fileno())
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.detach()


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
