"""In the notebook: the thread that watches every rank of a pool.

It accepts the ranks' connections, reads their events as they come, answers nothing itself but
routes: ``where`` replies to whoever asked, everything else to the pool's event queue (consumed
by the thread that runs a task, so printing happens in the notebook's cell). It also notices
ranks that exit, within a fraction of a second, and reports them as :class:`RankExited` after
reading whatever they sent before dying. If the reader thread itself crashes (a message this
process cannot unpickle, say), the crash is kept in ``crash`` and the pool's next wait for an event
raises it as :class:`~.errors.SupervisorCrashedError` (see :meth:`.ranks.Ranks.select`) instead of
waiting for events that can no longer come.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..live.channel import EventListener
from ..live.events import Heartbeat, RankExited, RankReady, RankStarted, TaskDone, TaskFailed, WhereReply
from .processes import describe_exit
from .protocol import SetupPayload
from .starters import RankProcess

POLL_INTERVAL = 0.2


@dataclass
class RankHandle:
    """The notebook's view of one rank."""

    rank: int
    process: RankProcess
    connection: Optional[Connection] = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    state: str = "starting"  # starting | idle | running | exited
    exitcode: Optional[int] = None
    exit_expected: bool = False
    heartbeat: Optional[Heartbeat] = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def send(self, message: Any) -> bool:
        """Send ``message`` to the rank; ``False`` if the connection is gone."""
        if self.connection is None:
            return False
        try:
            with self.send_lock:
                self.connection.send(message)
            return True
        except (OSError, EOFError, ValueError):
            return False


class Supervisor:
    """Accepts, reads and reaps for one pool (two daemon threads); see the module docstring."""

    def __init__(self, handles: List[RankHandle], listener: EventListener, events: "queue.Queue[Any]",
                 setup_payload: Optional[bytes]) -> None:
        self.handles = handles
        self.events = events
        self._listener = listener
        self._setup_payload = setup_payload
        self._new_connections: List[Connection] = []
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        self._stopping = threading.Event()
        self._finishing = threading.Event()
        self.task_running = threading.Event()  # set by the run loop while it consumes events
        self.idle_heartbeats: Optional[Callable[[Any], None]] = None  # called with heartbeats between tasks
        self._where: Dict[int, Dict[int, WhereReply]] = {}
        self.changed = threading.Condition()
        #: set if the reader thread crashed: ``(exception, rank whose message it was reading or None)``
        self.crash: Optional[Tuple[BaseException, Optional[int]]] = None
        self._reading: Optional[Connection] = None  # the connection being read, named in a crash
        self._acceptor = threading.Thread(target=self._accept, name="notebook-fabric acceptor", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="notebook-fabric supervisor", daemon=True)

    def start(self) -> None:
        self._listener.start()  # only now: every rank is forked, no challenge runs while one forks
        self._acceptor.start()
        self._reader.start()

    def stop_accepting(self) -> None:
        """All ranks connected (or gave up): release the listening port."""
        if self._acceptor.is_alive():
            self._listener.wake()
            self._acceptor.join(timeout=5)
        self._listener.close()

    def finish_when_all_exited(self) -> None:
        """The pool is ending: the reader thread may leave as soon as no rank is left."""
        self._finishing.set()

    def stop(self) -> None:
        self._stopping.set()
        self.stop_accepting()
        if self._reader.is_alive():
            os.write(self._wake_write, b"x")
            self._reader.join(timeout=5)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- where requests -------------------------------------------------------------------------
    def expect_where(self, request_id: int) -> None:
        with self.changed:
            self._where[request_id] = {}

    def where_replies(self, request_id: int, ranks: List[int], timeout: float) -> Dict[int, WhereReply]:
        """Wait until every rank in ``ranks`` answered ``request_id`` (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                replies = self._where.get(request_id, {})
                missing = [r for r in ranks if r not in replies and self.handles[r].alive]
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return dict(self._where.pop(request_id, {}))
                self.changed.wait(remaining)

    # -- threads --------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping.is_set():
            connection = self._listener.accept()
            if connection is None:
                return
            with self._lock:
                self._new_connections.append(connection)
            os.write(self._wake_write, b"c")

    def _read_loop(self) -> None:
        try:
            self._read_until_stopped()
        except BaseException as error:  # noqa: BLE001 - kept for the pool's caller, who raises it (Ranks.select)
            rank = next((h.rank for h in self.handles if h.connection is not None and h.connection is self._reading), None)
            self.crash = (error, rank)
            with self.changed:
                self.changed.notify_all()

    def _read_until_stopped(self) -> None:
        connections: List[Connection] = []
        while not self._stopping.is_set():
            sentinels = {h.process.sentinel: h for h in self.handles if h.alive and h.process.sentinel is not None}
            ready = wait([*connections, self._wake_read, *sentinels], timeout=POLL_INTERVAL)
            if self._wake_read in ready:
                os.read(self._wake_read, 4096)
                with self._lock:
                    connections.extend(self._new_connections)
                    self._new_connections.clear()
            for connection in [c for c in ready if isinstance(c, Connection)]:
                if not self._drain(connection):
                    connections.remove(connection)
            self._reap(connections)
            if self._finishing.is_set() and not any(h.alive for h in self.handles):
                return
            if any(isinstance(r, int) and r in sentinels and sentinels[r].alive for r in ready):
                time.sleep(0.01)  # exited but not yet reapable: do not spin

    def _drain(self, connection: Connection, known_readable: bool = True) -> bool:
        """Read everything available on ``connection``; ``False`` once it is closed."""
        self._reading = connection
        still_open = self._receive_all(connection, known_readable)
        self._reading = None  # not reached when reading raised: the crash names the rank
        return still_open

    def _receive_all(self, connection: Connection, known_readable: bool) -> bool:
        try:
            if not known_readable and not connection.poll(0):
                return True
            while True:
                self._route(connection, connection.recv())
                if not connection.poll(0):
                    return True
        except (EOFError, OSError):
            connection.close()
            return False

    def _route(self, connection: Connection, event: Any) -> None:
        handle = self.handles[event.rank] if 0 <= getattr(event, "rank", -1) < len(self.handles) else None
        if isinstance(event, WhereReply):
            with self.changed:
                if event.request_id in self._where:
                    self._where[event.request_id][event.rank] = event
                self.changed.notify_all()
            return
        if handle is not None:
            if isinstance(event, RankStarted):
                handle.connection = connection
                if self._setup_payload is not None:
                    handle.send(SetupPayload(self._setup_payload))
            elif isinstance(event, Heartbeat):
                handle.heartbeat = event
                if not self.task_running.is_set():
                    if self.idle_heartbeats is not None:  # the pool's idle sink wants them at all times
                        self.idle_heartbeats(event)
                    return  # between tasks nobody consumes events: keep only the latest, on the handle
            elif isinstance(event, (RankReady, TaskDone, TaskFailed)):
                handle.state = "idle"
        self.events.put(event)

    def _reap(self, connections: List[Connection]) -> None:
        for handle in self.handles:
            if not handle.alive:
                continue
            exitcode = handle.process.exitcode
            if exitcode is None:
                continue
            if handle.connection is not None and handle.connection in connections:
                self._drain(handle.connection, known_readable=False)  # what it said before dying comes first
                connections.remove(handle.connection)
            handle.exitcode = exitcode
            handle.state = "exited"
            self.events.put(RankExited(rank=handle.rank, time=time.time(), exitcode=exitcode,
                                       description=_describe_exit(handle.process, exitcode), expected=handle.exit_expected,
                                       last_words=handle.process.last_words() if exitcode != 0 else ""))
            with self.changed:
                self.changed.notify_all()


def _describe_exit(process: RankProcess, exitcode: int) -> str:
    """How the rank ended, in words; a rank on another host says which host (its starter knows more)."""
    describe = getattr(process, "describe_exit", None)
    return describe(exitcode) if describe is not None else describe_exit(exitcode)
