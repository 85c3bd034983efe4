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
import selectors
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    exit_event: Optional[RankExited] = None  # how it ended (with the faulthandler's last words)
    ended_by_pool: bool = False  # the pool terminated or killed it (it did not leave when asked)

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
                 setup_payload: Optional[bytes], connected: Sequence[Connection] = ()) -> None:
        """``connected``: connections to ranks made before they started (forked ranks' socket pairs);
        when there is one per rank, nothing listens for ranks dialling back."""
        self.handles = handles
        self._connected = list(connected)
        self._accepting = len(self._connected) < len(handles)
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
        self._armed: Optional[Tuple[Any, List[int]]] = None  # a task to send the moment every rank is ready
        self._ready: set = set()
        self.changed = threading.Condition()
        #: set if the reader thread crashed: ``(exception, rank whose message it was reading or None)``
        self.crash: Optional[Tuple[BaseException, Optional[int]]] = None
        self._reading: Optional[Connection] = None  # the connection being read, named in a crash
        self._acceptor = threading.Thread(target=self._accept, name="notebook-fabric acceptor", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="notebook-fabric supervisor", daemon=True)

    def start(self) -> None:
        if self._accepting:
            self._listener.start()  # only now: every rank is forked, no challenge runs while one forks
            self._acceptor.start()
        self._reader.start()

    def stop_accepting(self) -> None:
        """All ranks connected (or gave up): release the listening port."""
        if self._acceptor.is_alive():
            self._listener.wake()
            self._acceptor.join(timeout=5)
        self._listener.close()

    def arm(self, message: Any, ranks: List[int]) -> None:
        """Send ``message`` (a ``RunTask``) to ``ranks`` from this thread as soon as every rank is
        ready: the first task of a launch starts without waiting for the caller's thread to wake up
        (call before :meth:`start`)."""
        self._armed = (message, list(ranks))

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
        """Wait on every connection, the wake pipe and every rank's exit sentinel in one selector
        (registered once, not rebuilt per wake-up); look at a rank's exit only when its sentinel
        fired (a rank without one, on another host, is asked on every pass)."""
        watch = _Watched(self._wake_read)
        exiting: Dict[int, RankHandle] = {}  # sentinel fired, not reaped yet (a forkserver pipe closes before)
        try:
            for connection in self._connected:
                watch.add(connection.fileno(), connection)
            for handle in self.handles:
                if handle.alive and handle.process.sentinel is not None:
                    watch.add(handle.process.sentinel, handle)
            polled = [h for h in self.handles if h.process.sentinel is None]
            while not self._stopping.is_set():
                ready = watch.select(POLL_INTERVAL)
                for key in ready:
                    if key is None:  # the wake pipe: new connections, or stop
                        os.read(self._wake_read, 4096)
                        with self._lock:
                            fresh, self._new_connections = self._new_connections, []
                        for connection in fresh:
                            watch.add(connection.fileno(), connection)
                    elif isinstance(key, RankHandle):
                        exiting[key.rank] = key
                for connection in [k for k in ready if isinstance(k, Connection)]:
                    self._drain(connection, watch=watch)
                candidates = list(exiting.values()) + [h for h in polled if h.alive]
                reaped = self._reap(candidates, watch)
                for handle in reaped:
                    exiting.pop(handle.rank, None)
                if self._finishing.is_set() and not any(h.alive for h in self.handles):
                    return
                if any(h.alive for h in exiting.values()):
                    time.sleep(0.01)  # exited but not yet reapable: do not spin
        finally:
            watch.close()

    def _drain(self, connection: Connection, known_readable: bool = True, watch: Optional["_Watched"] = None) -> bool:
        """Read everything available on ``connection``; ``False`` once it is closed."""
        self._reading = connection
        still_open = self._receive_all(connection, known_readable, watch)
        self._reading = None  # not reached when reading raised: the crash names the rank
        return still_open

    def _receive_all(self, connection: Connection, known_readable: bool, watch: Optional["_Watched"]) -> bool:
        try:
            if not known_readable and not connection.poll(0):
                return True
            while True:
                self._route(connection, connection.recv())
                if not connection.poll(0):
                    return True
        except (EOFError, OSError):
            if watch is not None:
                watch.discard(connection)
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
            if isinstance(event, RankReady):
                self._ready.add(event.rank)
                self.events.put(event)
                self._send_armed()
                return
        self.events.put(event)

    def _send_armed(self) -> None:
        """The armed task goes out once every rank is ready (queued after the last ``RankReady``)."""
        if self._armed is None or len(self._ready) < len(self.handles):
            return
        message, ranks = self._armed
        self._armed = None
        self.task_running.set()
        for rank in ranks:
            handle = self.handles[rank]
            handle.state = "running"
            handle.send(message)

    def _reap(self, candidates: List[RankHandle], watch: "_Watched") -> List[RankHandle]:
        """Report every rank among ``candidates`` whose process has ended; returns those."""
        reaped = []
        for handle in candidates:
            exitcode = handle.process.exitcode if handle.alive else handle.exitcode
            if exitcode is None:
                continue
            if handle.process.sentinel is not None:
                watch.discard_fd(handle.process.sentinel)
            reaped.append(handle)
            if not handle.alive:  # reported already
                continue
            if handle.connection is not None and watch.has(handle.connection):
                self._drain(handle.connection, known_readable=False, watch=watch)  # what it said before dying comes first
                watch.discard(handle.connection)
            handle.exitcode = exitcode
            handle.state = "exited"
            handle.exit_event = RankExited(rank=handle.rank, time=time.time(), exitcode=exitcode,
                                           description=_describe_exit(handle.process, exitcode),
                                           expected=handle.exit_expected,
                                           last_words=handle.process.last_words() if exitcode != 0 else "")
            self.events.put(handle.exit_event)
            with self.changed:
                self.changed.notify_all()
        return reaped


class _Watched:
    """The supervisor's selector: descriptors registered once, each with what it stands for
    (``None`` for the wake pipe, a :class:`Connection`, or the :class:`RankHandle` of an exit sentinel)."""

    def __init__(self, wake_fd: int) -> None:
        self._selector = selectors.DefaultSelector()
        self._selector.register(wake_fd, selectors.EVENT_READ, None)

    def add(self, fd: int, what: Any) -> None:
        self._selector.register(fd, selectors.EVENT_READ, what)

    def has(self, connection: Connection) -> bool:
        try:
            key = self._selector.get_key(connection.fileno())
        except (KeyError, ValueError, OSError):
            return False
        return key.data is connection

    def discard(self, connection: Connection) -> None:
        if self.has(connection):
            self._selector.unregister(connection.fileno())

    def discard_fd(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def select(self, timeout: float) -> List[Any]:
        return [key.data for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()


def _describe_exit(process: RankProcess, exitcode: int) -> str:
    """How the rank ended, in words; a rank on another host says which host (its starter knows more)."""
    describe = getattr(process, "describe_exit", None)
    return describe(exitcode) if describe is not None else describe_exit(exitcode)
