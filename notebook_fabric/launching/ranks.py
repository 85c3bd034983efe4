"""``Ranks``: a pool's rank processes as the run loop, hang detection and stepping see them.

The run loop (:mod:`.run_loop`), :mod:`.hang` and the prompt server
(:mod:`notebook_fabric.stepping.prompt_server`) need a handful of verbs, not the pool: hand a task
to some ranks, select the next event, ask where the ranks are, interrupt them, answer one, tell who
has exited, end them all. A host that starts its ranks some other way provides the same object.
"""
from __future__ import annotations

import itertools
import queue
import signal
from typing import Any, Callable, Dict, Iterable, List, Optional

from ..live.events import Heartbeat, RankEvent, WhereReply
from ..live.sinks import EventSink
from .errors import SupervisorCrashedError
from .processes import describe_exit, signal_process
from .protocol import RunTask, WhereRequest


class Ranks:
    """The ranks of one pool (see the module docstring). ``ledgers``: each rank's newest collective
    ledger entries, kept across tasks. ``stop(grace)`` ends every rank (the pool's stop);
    ``keep_logs()`` keeps the log folder of a failed run; ``new_sources()`` are the notebook cells a
    task must carry (spawn and forkserver ranks do not inherit them)."""

    def __init__(self, handles: List[Any], events: "queue.Queue[RankEvent]", *, stop: Callable[[float], None],
                 keep_logs: Callable[[], None], new_sources: Callable[[], Dict[str, Any]]) -> None:
        self._handles = handles
        self._events = events
        self._stop = stop
        self._keep_logs = keep_logs
        self._new_sources = new_sources
        self._supervisor: Any = None
        self._ids = itertools.count(1)
        self.ledgers: Dict[int, tuple] = {}

    def attach(self, supervisor: Any) -> None:
        """The supervisor that reads the ranks' connections (``where`` replies arrive through it)."""
        self._supervisor = supervisor

    @property
    def world_size(self) -> int:
        return len(self._handles)

    # -- tasks and events ------------------------------------------------------------------------
    def begin_task(self, ranks: Iterable[int], payload: bytes, exit_after: bool) -> int:
        """Send the pickled task to ``ranks``; returns its id. Heartbeats are events until :meth:`end_task`."""
        task_id = next(self._ids)
        message = RunTask(task_id=task_id, payload=payload, source_cache=self._new_sources(), exit_after=exit_after)
        for rank in ranks:
            handle = self._handles[rank]
            handle.state = "running"
            handle.exit_expected = handle.exit_expected or exit_after
            handle.send(message)
        return task_id

    def arm_task(self, ranks: Iterable[int], payload: bytes, exit_after: bool) -> int:
        """Like :meth:`begin_task`, but the supervisor sends it the moment every rank is ready
        (before the pool's start returns); returns its id, which :meth:`RunLoop` is then given."""
        task_id = next(self._ids)
        message = RunTask(task_id=task_id, payload=payload, source_cache=self._new_sources(), exit_after=exit_after)
        selected = list(ranks)
        for rank in selected:
            self._handles[rank].exit_expected = self._handles[rank].exit_expected or exit_after
        self._supervisor.arm(message, selected)
        return task_id

    def watch_task(self, running: bool) -> None:
        """While a task runs, heartbeats are queued as events too (else only kept per rank)."""
        if self._supervisor is not None:
            (self._supervisor.task_running.set if running else self._supervisor.task_running.clear)()

    def select(self, timeout: float) -> Optional[RankEvent]:
        """The next event from any rank, or ``None`` after ``timeout`` seconds.

        Raises :class:`SupervisorCrashedError` once the queued events are consumed if the thread that
        reads the ranks' messages crashed (no event would ever come): the ranks are ended first."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            crash = getattr(self._supervisor, "crash", None)
            if crash is None:
                return None
        error, rank = crash
        self._stop(0.5)
        source = f" while reading a message from rank {rank}" if rank is not None else ""
        raise SupervisorCrashedError(
            f"the notebook's supervisor thread (it reads the ranks' messages) crashed{source}:"
            f" {type(error).__name__}: {error}. Nothing could hear the ranks any more, so they were stopped.",
            rank=rank,
        ) from error

    def drain(self, sink: EventSink) -> None:
        """Hand every queued event to ``sink``."""
        while True:
            try:
                sink.handle(self._events.get_nowait())
            except queue.Empty:
                return

    def heartbeat(self, rank: int) -> Optional[Heartbeat]:
        return self._handles[rank].heartbeat

    # -- asking and acting -----------------------------------------------------------------------
    def where(self, timeout: float = 3.0, ledger: bool = False) -> Dict[int, WhereReply]:
        """The :class:`WhereReply` of every living rank that answered within ``timeout`` (with its
        collective ledger when ``ledger``); their side threads answer even while a task is stuck."""
        if self._supervisor is None:
            return {}
        request_id = next(self._ids)
        self._supervisor.expect_where(request_id)
        asked = [h.rank for h in self._handles if h.alive and h.send(WhereRequest(request_id, ledger=ledger))]
        return self._supervisor.where_replies(request_id, asked, timeout)

    def interrupt(self, ranks: Iterable[int]) -> List[int]:
        """SIGINT (KeyboardInterrupt in the running task) to ``ranks``; returns who got it."""
        return [r for r in ranks if self._handles[r].alive and _interrupt(self._handles[r])]

    def answer(self, rank: int, message: Any) -> bool:
        """Send ``message`` (a prompt's reply) to ``rank``; ``False`` if its connection is gone."""
        return self._handles[rank].send(message)

    def mark(self, rank: int, state: str, only_from: Optional[str] = None) -> None:
        """Show ``rank`` as ``state`` (``"in the debugger"``) while it is alive, if it is ``only_from`` now."""
        if not 0 <= rank < len(self._handles):
            return
        handle = self._handles[rank]
        if (only_from is None or handle.state == only_from) and handle.alive and handle.state != "exited":
            handle.state = state

    def end(self, grace: float) -> None:
        """End every rank: ask, then SIGTERM, then SIGKILL (the pool's stop)."""
        self._stop(grace)

    def keep_logs(self) -> None:
        self._keep_logs()

    # -- who is where ----------------------------------------------------------------------------
    def running(self) -> List[int]:
        """Living ranks that run a task now."""
        return [h.rank for h in self._handles if h.alive and h.state == "running"]

    def living(self) -> List[int]:
        return [h.rank for h in self._handles if h.alive]

    def has_exited(self, rank: int) -> bool:
        """Whether ``rank``'s process has ended (asked of the process: its exit event may be on its way)."""
        return self._handles[rank].process.exitcode is not None

    def never_connected(self, ranks: Iterable[int]) -> List[int]:
        return [r for r in ranks if self._handles[r].connection is None]

    def pid(self, rank: int) -> int:
        return self._handles[rank].pid

    @property
    def hosts(self) -> Dict[int, str]:
        """rank -> host for ranks on other hosts (their process says where: ``host``); empty on one machine."""
        return {h.rank: h.process.host for h in self._handles if getattr(h.process, "host", "")}

    def deaths(self, seen: Dict[int, Any]) -> Dict[int, str]:
        """Every rank that died: those whose exit event was ``seen`` (rank -> ``RankExited``), and those
        whose process ended unasked although its exit event had not arrived yet."""
        deaths = {rank: event.description for rank, event in seen.items()}
        for handle in self._handles:
            try:
                code = handle.exitcode if handle.exitcode is not None else handle.process.exitcode
            except ValueError:  # a process object the pool already closed: its exit was seen, or it was stopped
                continue
            if code is not None and not handle.exit_expected and handle.rank not in deaths:
                deaths[handle.rank] = describe_exit(code)
        return deaths


def _interrupt(handle: Any) -> bool:
    """SIGINT to one rank: its starter's way where it has one (a rank on another host), else the OS signal."""
    interrupt = getattr(handle.process, "interrupt", None)
    return interrupt() if interrupt is not None else signal_process(handle.pid, signal.SIGINT)
