"""The event channel's guarantees, and that nothing else on the machine can stall a launch.

- it listens on 127.0.0.1 only; a wrong key is refused; a stranger's pickle is never unpickled;
- a silent connection, a wrong-keyed one and one that hangs up mid-challenge, all opened before
  the ranks connect, cost a launch nothing;
- ``timeout=`` bounds the start too, and the start-up error tells the ranks that never connected
  apart from those that never joined the process group.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import psutil
import pytest

from support.processes import wait_no_children
from notebook_fabric import launch
from notebook_fabric.launching import LaunchTimeoutError
from notebook_fabric.live.channel import EventListener
from notebook_fabric.live.events import RankStarted
from notebook_fabric.live.sinks import RecordingSink
from support.waiting import poll, wait_until

pytestmark = pytest.mark.timeout(180)
COMES_BACK_WITHIN = 20.0  # seconds; generous for 2 shared cores


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


def listening_sockets(pid: int = None):
    return [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def frame(payload: bytes) -> bytes:
    """``multiprocessing.connection``'s wire format: a 4-byte big-endian length, then the bytes."""
    return struct.pack("!i", len(payload)) + payload


def read_frame(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return b""
        header += chunk
    (size,) = struct.unpack("!i", header)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class Touch:
    """Unpickling this creates ``path``: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_listener_is_bound_to_loopback_only():
    listener = EventListener().start()
    try:
        assert listener.address[0] == "127.0.0.1"
        mine = [c for c in listening_sockets() if c.laddr.port == listener.address[1]]
        assert [c.laddr.ip for c in mine] == ["127.0.0.1"]
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for address in others:  # the port is not reachable through the machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((address, listener.address[1]), timeout=2).close()
    finally:
        listener.close()
    assert not [c for c in listening_sockets() if c.laddr.port == listener.address[1]]


def test_a_wrong_key_is_refused_and_the_right_one_still_gets_in():
    listener = EventListener().start()
    try:
        with pytest.raises(AuthenticationError):
            Client(listener.address, family="AF_INET", authkey=os.urandom(32))
        client = Client(listener.address, family="AF_INET", authkey=listener.authkey)
        server = listener.accept()
        client.send({"hello": 1})
        assert server.recv() == {"hello": 1}
        client.close()
        server.close()
        assert listener.refused == 1
    finally:
        listener.close()


def test_a_strangers_pickle_is_never_unpickled(tmp_path):
    listener = EventListener().start()
    proof = tmp_path / "unpickled"
    try:
        small = socket.create_connection(listener.address)  # answers the challenge with a pickle
        assert read_frame(small).startswith(b"#CHALLENGE#")
        small.sendall(frame(pickle.dumps(Touch(str(proof)))))
        big = socket.create_connection(listener.address)  # ignores the challenge: a large pickle, then more
        big.sendall(frame(pickle.dumps([Touch(str(proof))] * 100)) * 3)
        wait_until(lambda: listener.refused >= 2, 10, "the listener to refuse both strangers")
        assert listener.refused == 2
        client = Client(listener.address, family="AF_INET", authkey=listener.authkey)
        server = listener.accept()  # the strangers never come out of accept()
        client.send("rank")
        assert server.recv() == "rank"
        for sock in (small, big, client, server):
            sock.close()
        assert not proof.exists()
    finally:
        listener.close()


def test_a_silent_connection_is_hung_up_after_the_handshake_deadline():
    listener = EventListener(handshake_timeout=0.5).start()
    try:
        silent = socket.create_connection(listener.address)
        assert read_frame(silent).startswith(b"#CHALLENGE#")
        silent.settimeout(10)
        assert silent.recv(1) == b""  # the listener hung up on us
        # counted by the challenge's own thread
        wait_until(lambda: listener.refused >= 1, 10, "the listener to count the silent connection as refused")
        assert listener.refused == 1
        silent.close()
    finally:
        listener.close()


class Intruder:
    """Watches this process's listening ports; on the launch's event channel (the port that sends a
    challenge first) it opens the connections named in ``kinds``: ``silent`` (never answers),
    ``wrong key``, ``half`` (hangs up in the middle of the challenge)."""

    def __init__(self, kinds=("silent", "wrong key", "half")) -> None:
        self.kinds = set(kinds)
        self.before = {c.laddr.port for c in listening_sockets()}
        self.sockets: list = []
        self.opened_at: float = 0.0
        self.listening_ips: set = set()
        self.wrong_key_refused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        probed = set()
        while not self._stop.is_set() and not self.opened_at:
            for connection in listening_sockets():
                port = connection.laddr.port
                if port in self.before or port in probed:
                    continue
                probed.add(port)
                self.listening_ips.add(connection.laddr.ip)
                # each port in its own thread: the rendezvous store never greets, and on a loaded
                # machine the channel's challenge may take a while, so no probe waits for another
                threading.Thread(target=self._probe, args=(port,), daemon=True).start()
            time.sleep(0.002)

    def _probe(self, port: int) -> None:
        probe = socket.create_connection(("127.0.0.1", port))
        try:
            greeting = read_frame(probe, timeout=10)
        except (socket.timeout, OSError):
            greeting = b""
        if not greeting.startswith(b"#CHALLENGE#"):
            probe.close()  # the rendezvous store: not ours to poke
            return
        if "silent" in self.kinds:
            self.sockets.append(probe)  # silent from here on
        if "half" in self.kinds:
            half = socket.create_connection(("127.0.0.1", port))
            try:
                read_frame(half, timeout=10)
            except (socket.timeout, OSError):
                pass
            half.close()  # hung up in the middle of the challenge
        if "silent" not in self.kinds:
            probe.close()  # read the challenge and hung up: one more half-finished handshake
        if "wrong key" in self.kinds:
            threading.Thread(target=self._wrong_key, args=(port,), daemon=True).start()
        self.opened_at = time.time()

    def _wrong_key(self, port: int) -> None:
        try:
            Client(("127.0.0.1", port), family="AF_INET", authkey=b"not the key")
        except AuthenticationError:
            self.wrong_key_refused = True
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self.sockets:
            sock.close()


def world_size_times_ten(fabric):
    return fabric.world_size * 10


@pytest.mark.parametrize("kinds", [("silent",), ("wrong key",), ("half",), ("silent", "wrong key", "half")],
                         ids=["silent", "wrong key", "half handshake", "all three"])
def test_hostile_local_connections_before_the_ranks_connect_cost_the_launch_nothing(kinds):
    started = time.monotonic()
    assert launch(world_size_times_ten, accelerator="cpu", devices=2, start_method="spawn") == 20
    clean = time.monotonic() - started
    intruder = Intruder(kinds)
    sink = RecordingSink()
    try:
        started = time.monotonic()
        value = launch(world_size_times_ten, accelerator="cpu", devices=2, start_method="spawn", timeout=30, sink=sink)
        hostile = time.monotonic() - started
    finally:
        intruder.close()
    assert value == 20
    assert intruder.opened_at, "the intruder never found the event channel"
    first_rank_started = min(e.time for e in sink.events if isinstance(e, RankStarted))
    assert intruder.opened_at < first_rank_started, "the ranks connected before the intruder: nothing was tested"
    if "wrong key" in kinds:
        assert poll(lambda: intruder.wrong_key_refused, 10), "the wrong key was never refused"
    assert intruder.listening_ips == {"127.0.0.1"}  # the event channel and the rendezvous store
    assert hostile < clean + 10.0, f"clean launch {clean:.1f} s, with intruders {hostile:.1f} s"


def test_start_up_timeout_names_ranks_that_never_connected_apart_from_those_that_never_joined():
    stopped = []

    def stop_the_second_rank_before_it_connects():
        seen = []
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            for child in psutil.Process().children():
                try:
                    if child.pid not in seen and "spawn_child" in " ".join(child.cmdline()):
                        seen.append(child.pid)
                except psutil.Error:
                    continue
            time.sleep(0.002)
        if len(seen) == 2:
            os.kill(seen[1], signal.SIGSTOP)
            stopped.append(seen[1])

    threading.Thread(target=stop_the_second_rank_before_it_connects, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(LaunchTimeoutError) as caught:
        launch(world_size_times_ten, accelerator="cpu", devices=2, start_method="spawn", timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 5 + COMES_BACK_WITHIN, f"took {elapsed:.1f} s with timeout=5"
    error = caught.value
    assert stopped
    assert len(error.never_connected) == 1 and error.not_joined == [1 - error.never_connected[0]]
    message = str(error)
    assert "timeout=5 s" in message
    assert f"rank {error.never_connected[0]} never connected to the notebook (pid {stopped[0]})" in message
    assert f"rank {error.not_joined[0]} connected but never joined the process group" in message
