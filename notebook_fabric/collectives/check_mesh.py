"""Debug mode's side channel: one TCP connection between every pair of ranks on one machine.

A gloo collective costs a few hundred microseconds on a small machine, almost all of it handing the
work to gloo's threads and back; sending 24 bytes over a connected socket from the calling thread
costs about 15. Debug mode compares every collective across the ranks before it runs, so it swaps
the gloo all-gather of its fingerprint for this mesh when all ranks share one host (a notebook's
ranks do). Across hosts it is not built and the check stays on gloo.

The mesh is built once, by every rank at the same point (``enable_signature_checks``), with the
addresses exchanged over a gloo group. Each listener is bound to loopback and takes only a peer
that opens with the listener's secret (32 random bytes sent with the address over gloo): frames are
pickles, so a stranger's connection is closed before anything it sends is read as one. Each exchange sends the same frame to every peer and reads
one from each; a peer that closed its end (its process ended) raises :class:`MeshPeerGone`.
"""
from __future__ import annotations

import hmac
import pickle
import secrets
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

_RANK = struct.Struct("<i")
_LENGTH = struct.Struct("<q")
_SECRET_BYTES = 32
_HELLO_TIMEOUT_S = 5.0  # how long an accepted connection may take to say who it is
_BUILD_TIMEOUT_S = 60.0


class MeshPeerGone(RuntimeError):
    """A peer's connection closed (or timed out) in the middle of a check."""


class CheckMesh:
    """Connected sockets to every other rank of the world (see the module docstring)."""

    def __init__(self, rank: int, peers: Dict[int, socket.socket]) -> None:
        self.rank = rank
        self.peers = dict(sorted(peers.items()))
        self._sockets = list(self.peers.items())

    def exchange(self, frame: bytes) -> List[bytes]:
        """``frame`` (the same length on every rank) sent to every peer; every rank's frame by rank."""
        self._send(frame)
        size = len(frame)
        received = {self.rank: frame}
        for rank, peer in self._sockets:
            received[rank] = _receive_exactly(rank, peer, size)
        return [received[r] for r in sorted(received)]

    def exchange_objects(self, obj: Any) -> List[Any]:
        """Any picklable ``obj`` from every rank (length-prefixed frames), by rank."""
        payload = pickle.dumps(obj)
        self._send(_LENGTH.pack(len(payload)) + payload)
        received = {self.rank: obj}
        for rank, peer in self._sockets:
            (length,) = _LENGTH.unpack(_receive_exactly(rank, peer, _LENGTH.size))
            received[rank] = pickle.loads(_receive_exactly(rank, peer, length))
        return [received[r] for r in sorted(received)]

    def _send(self, frame: bytes) -> None:
        for rank, peer in self._sockets:
            try:
                peer.sendall(frame)
            except OSError as error:
                raise MeshPeerGone(f"rank {rank} ended before reaching the collective ({error})") from None

    def close(self) -> None:
        for _, peer in self._sockets:
            try:
                peer.close()
            except OSError:
                pass
        self._sockets = []


def _receive_exactly(rank: int, peer: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``peer`` (rank ``rank``); :class:`MeshPeerGone` if it closes or times out first."""
    chunks = []
    while size:
        try:
            chunk = peer.recv(size)
        except socket.timeout:
            raise MeshPeerGone(f"rank {rank} did not reach the collective (debug mode's check timed out)") from None
        except OSError as error:
            raise MeshPeerGone(f"rank {rank} ended before reaching the collective ({error})") from None
        if not chunk:
            raise MeshPeerGone(f"rank {rank} ended before reaching the collective")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def build_mesh(group: Any, timeout: Optional[float] = None) -> Optional[CheckMesh]:
    """The mesh over ``group`` (the world; every rank calls this at the same point), or ``None``
    when the ranks are on several hosts or a connection cannot be made."""
    import torch.distributed as dist

    import torch

    rank, size = dist.get_rank(), dist.get_world_size()
    peers: Dict[int, socket.socket] = {}
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(size)
        secret = secrets.token_bytes(_SECRET_BYTES)
        mine = (socket.gethostname(), listener.getsockname()[1], secret)
        everyone: List[Any] = [None] * size
        dist.all_gather_object(everyone, mine, group=group)
        if len({host for host, _, _ in everyone}) == 1:
            doors = [(port, key) for _, port, key in everyone]
            peers = _connect(rank, size, listener, doors, timeout)
    except OSError:
        peers = {}
    finally:
        listener.close()
    built = torch.tensor([1 if peers or size == 1 else 0])
    dist.all_reduce(built, op=dist.ReduceOp.MIN, group=group)  # all ranks use the mesh, or none
    mesh = CheckMesh(rank, peers)
    if not int(built.item()):
        mesh.close()
        return None
    return mesh


def _connect(rank: int, size: int, listener: socket.socket, doors: List[Tuple[int, bytes]],
             timeout: Optional[float]) -> Dict[int, socket.socket]:
    """Connect to every lower rank (its listener's backlog holds us), then accept every higher one.

    ``doors`` holds each rank's (port, secret). A connecting rank opens with its rank and the
    listener's secret; an accepted connection that does not is closed, and accepting goes on.
    """
    peers: Dict[int, socket.socket] = {}
    for other in range(rank):
        port, key = doors[other]
        peer = socket.create_connection(("127.0.0.1", port), timeout=_BUILD_TIMEOUT_S)
        peer.sendall(_RANK.pack(rank) + key)
        peers[other] = peer
    expected = set(range(rank + 1, size))
    my_key = doors[rank][1]
    deadline = time.monotonic() + _BUILD_TIMEOUT_S
    while expected:
        listener.settimeout(max(0.0, deadline - time.monotonic()))
        peer, _ = listener.accept()  # socket.timeout (an OSError) past the deadline: no mesh
        other = _hello(peer, my_key)
        if other in expected:
            expected.discard(other)
            peers[other] = peer
        else:
            peer.close()  # not one of our ranks
    for peer in peers.values():
        peer.settimeout(timeout)
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return peers


def _hello(peer: socket.socket, key: bytes) -> int:
    """The rank an accepted connection names, or -1 when it does not know this listener's secret."""
    peer.settimeout(_HELLO_TIMEOUT_S)
    try:
        hello = _receive_exactly(-1, peer, _RANK.size + _SECRET_BYTES)
    except MeshPeerGone:
        return -1
    (other,) = _RANK.unpack(hello[:_RANK.size])
    return other if hmac.compare_digest(hello[_RANK.size:], key) else -1
