"""The control channel off this machine: TLS with a certificate made per pool and pinned on both ends.

A pool whose ranks run on other hosts keeps its ordinary loopback channel
(:class:`~notebook_fabric.live.channel.EventListener`, HMAC challenge and all) and puts a TLS door
in front of it, on the one address the nodes reach (:class:`TLSDoor`). Inside a rank, a
:class:`LoopbackTunnel` gives the rank's unchanged code a loopback address whose connections go
out through TLS. The HMAC challenge thus runs end to end through the tunnel, and the door admits
only peers that present the pool's certificate (mutual TLS: the certificate is the only trust
anchor on both ends and its key travels to the ranks on srun's stdin, never on a command line or in
an environment), so a stranger on the network fails the TLS handshake and nothing is unpickled.

Each TLS connection is pumped by one thread of its own that alone touches the TLS object
(OpenSSL objects must not be used from two threads at once): :func:`pump`.

A host that is lost without a word (it crashed, lost power, or dropped off the network) closes
nothing, so both ends of every TLS connection have the kernel watch the peer (:func:`watch_peer`:
TCP keepalive probes after ``PEER_IDLE`` seconds of silence, and ``PEER_TIMEOUT`` seconds at most
for the peer to acknowledge anything). The peer's kernel answers for it however busy its processes
are, so a rank deep in a computation is never taken for lost; a host whose kernel is gone or cut
off is, within ``PEER_TIMEOUT`` seconds, and its connection then ends like a closed one.
"""
from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

Address = Tuple[str, int]
HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 16384  # one TLS record: a send either goes out whole or is retried with the same bytes
_BUFFER_LIMIT = 4 * 1024 * 1024
PEER_IDLE = 1  # seconds without traffic before the kernel probes the peer
PEER_TIMEOUT = 4  # seconds the peer's kernel may leave probes or data unacknowledged before the connection fails


def watch_peer(sock: socket.socket) -> None:
    """Have the kernel end ``sock`` when its peer's host stops acknowledging (see the module docstring)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", PEER_IDLE), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", PEER_TIMEOUT - PEER_IDLE),
                          ("TCP_USER_TIMEOUT", PEER_TIMEOUT * 1000)):
        if hasattr(socket, option):  # Linux has them all; elsewhere the system's keepalive defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


@dataclass(frozen=True)
class PoolCertificate:
    """A self-signed certificate and its private key (PEM), made for one pool."""

    certificate: bytes
    key: bytes

    @staticmethod
    def create() -> "PoolCertificate":
        """A fresh P-256 certificate, valid for two days, made with the ``openssl`` command."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("ranks on other hosts need a TLS certificate, made with the `openssl` command, which is"
                               " not on PATH: install OpenSSL (apt-get install openssl)")
        with tempfile.TemporaryDirectory(prefix="nf-tls-") as folder:  # 0700: only we read the key
            key, cert = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
            made = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                   "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=notebook-fabric pool"],
                                  capture_output=True, text=True)
            if made.returncode != 0:
                raise RuntimeError(f"openssl could not make the pool's certificate: {made.stderr.strip()}")
            with open(cert, "rb") as c, open(key, "rb") as k:
                return PoolCertificate(certificate=c.read(), key=k.read())

    def context(self, server: bool) -> ssl.SSLContext:
        """A TLS 1.3 context that presents this certificate and trusts it alone (nothing else)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # pinned: the peer must hold this very certificate's key
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.certificate.decode("ascii"))
        with tempfile.TemporaryDirectory(prefix="nf-tls-") as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert, self.certificate), (key, self.key)):
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(data)
            context.load_cert_chain(cert, key)
        return context


def pump(tls: ssl.SSLSocket, plain: socket.socket, on_end: Callable[[], None] = lambda: None) -> None:
    """Copy bytes both ways between ``tls`` and ``plain`` until one side closes; then deliver what is
    still buffered to the other side, close both and call ``on_end``. Runs in the calling thread."""
    tls.setblocking(False)
    plain.setblocking(False)
    to_tls, to_plain = bytearray(), bytearray()
    retry = 0  # length of a TLS send that must be repeated with the same bytes
    ended_by: Optional[socket.socket] = None
    try:
        while ended_by is None:
            readers = ([tls] if len(to_plain) < _BUFFER_LIMIT else []) + ([plain] if len(to_tls) < _BUFFER_LIMIT else [])
            writers = ([tls] if to_tls else []) + ([plain] if to_plain else [])
            if tls in readers and tls.pending():
                readable, writable = [tls], []
            else:
                readable, writable, _ = select.select(readers, writers, [])
            if tls in readable:
                try:
                    data = tls.recv(_CHUNK)
                    if data:
                        to_plain += data
                    else:
                        ended_by = tls
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if plain in readable and ended_by is None:
                try:
                    data = plain.recv(_CHUNK)
                    if data:
                        to_tls += data
                    else:
                        ended_by = plain
                except BlockingIOError:
                    pass
            if tls in writable and to_tls:
                size = retry or min(len(to_tls), _CHUNK)
                try:
                    sent = tls.send(bytes(to_tls[:size]))
                    del to_tls[:sent]
                    retry = 0
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    retry = size
            if plain in writable and to_plain:
                try:
                    del to_plain[:plain.send(to_plain)]
                except BlockingIOError:
                    pass
        # the last words of a side that closed still go to the other (a dying rank's final events)
        if ended_by is tls and to_plain:
            plain.setblocking(True)
            plain.sendall(to_plain)
        elif ended_by is plain and to_tls:
            tls.setblocking(True)
            tls.sendall(to_tls)
    except (OSError, ssl.SSLError, ValueError):
        pass
    finally:
        for sock in (tls, plain):
            try:
                sock.close()
            except OSError:
                pass
        on_end()


class TLSDoor:
    """The notebook's TLS front door on ``host``: each peer that completes mutual TLS with the pool's
    certificate and names its rank (4 bytes) is joined to a fresh connection to ``target`` (the
    loopback channel). ``on_closed(rank)`` is called when that rank's connection ends."""

    def __init__(self, host: str, target: Address, certificate: PoolCertificate,
                 on_closed: Callable[[int], None] = lambda rank: None) -> None:
        self._context = certificate.context(server=True)
        self._target = target
        self._on_closed = on_closed
        self.refused = 0
        self._closed = threading.Event()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._socket.bind((host, 0))
            self._socket.listen(256)
        except BaseException:
            self._socket.close()
            raise
        self.address: Address = self._socket.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="notebook-fabric TLS door", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting (connections already joined go on until their ends close)."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._socket.accept()
            except OSError:
                return
            threading.Thread(target=self._admit, args=(sock,), name="notebook-fabric TLS peer", daemon=True).start()

    def _admit(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            tls = self._context.wrap_socket(sock, server_side=True)
            rank = struct.unpack("!i", _read_exactly(tls, 4))[0]
            plain = socket.create_connection(self._target, timeout=HANDSHAKE_TIMEOUT)
            plain.settimeout(None)
            plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls.settimeout(None)
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch_peer(tls)
        except (OSError, ssl.SSLError, struct.error, ValueError):
            self.refused += 1
            sock.close()
            return
        pump(tls, plain, on_end=lambda: self._on_closed(rank))


class LoopbackTunnel:
    """On a rank's host: a loopback listener whose every connection is carried over TLS to ``remote``
    (the notebook's :class:`TLSDoor`), introduced as ``rank``.

    It lives in the process *above* the rank (see :mod:`notebook_fabric.launching.rank.srun_entry`), so
    what a rank sends just before it exits is still carried after it is gone: :meth:`finish` waits
    for that. Make it before forking the rank, :meth:`serve` after (threads do not survive a fork)."""

    def __init__(self, remote: Address, certificate: PoolCertificate, rank: int) -> None:
        self._context = certificate.context(server=False)
        self._remote = tuple(remote)
        self._rank = rank
        self._pumps: "list[threading.Thread]" = []
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.address: Address = self.socket.getsockname()[:2]

    def serve(self) -> "LoopbackTunnel":
        threading.Thread(target=self._accept_loop, name="notebook-fabric TLS tunnel", daemon=True).start()
        return self

    def finish(self, timeout: float = 10.0) -> None:
        """Stop accepting; wait until every carried connection delivered its last bytes and closed."""
        self.socket.close()
        deadline = time.monotonic() + timeout
        for pump_thread in list(self._pumps):
            pump_thread.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        while True:
            try:
                local, _ = self.socket.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._carry, args=(local,), name="notebook-fabric TLS pump", daemon=True)
            self._pumps.append(thread)
            thread.start()

    def _carry(self, local: socket.socket) -> None:
        try:
            raw = socket.create_connection(self._remote, timeout=HANDSHAKE_TIMEOUT)
            tls = self._context.wrap_socket(raw, server_side=False)
            tls.sendall(struct.pack("!i", self._rank))
            tls.settimeout(None)
            tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch_peer(tls)
        except (OSError, ssl.SSLError):
            local.close()  # the rank's connect then fails its challenge: it exits, saying so
            return
        pump(tls, local)


def _read_exactly(sock: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("the peer closed before naming its rank")
        data += chunk
    return data
