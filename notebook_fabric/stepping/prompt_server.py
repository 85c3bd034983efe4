"""In the notebook: serving the ranks that wait at a prompt, one at a time.

The run loop hands every event to :meth:`PromptServer.observe` and calls :meth:`PromptServer.serve`
between events, in the caller's thread, so the question is asked with the notebook process's own
``input()``: the kernel's stdin (an ``input_request`` to the frontend) in a notebook, the terminal
in a script. Policy:

- what the rank holding the floor prints while it steps is shown, tagged with its rank, whatever
  ``--show`` says (it is part of the dialogue);
- a rank at pdb's prompt holds the floor until it leaves the debugger (``continue``, ``quit``, its
  task ends); ``input()`` holds it for one answer. Ranks that stop together (within
  :data:`GATHER` seconds) are served in rank order; the next is served when the floor is free, or
  when the holder has run for :data:`HANDOVER_AFTER` seconds without asking again (e.g. ``next``
  over a collective that waits for a rank still at its prompt);
- while any rank is in the debugger the stall clock stands still (heartbeats' collective entry
  times are moved up to "now", then to the end of the last debugger session) and :meth:`paused_seconds` tells the
  run loop how long to add to the task's timeout; ranks waiting in a collective meanwhile are
  announced once: ``rank 0 waits for rank 1 (in the debugger) in all_reduce #1 ...``;
- an interrupt at the prompt (KeyboardInterrupt out of ``input()``) answers every waiting rank
  with ``abort`` (they leave the prompt with KeyboardInterrupt) and re-raises; until the run ends,
  later questions get ``abort`` too (:meth:`abort`);
- a notebook that cannot ask (a kernel without stdin: nbclient, CI) answers ``unavailable``: the
  rank raises :class:`~.messages.StdinUnavailableError` with a clear message instead of hanging.
"""
from __future__ import annotations

import builtins
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set, Tuple

from ..live.events import Heartbeat, Notice, Output, RankExited, TaskDone, TaskFailed
from ..live.sinks import EventSink, TextSink
from .messages import DebuggerLeft, InputReply, InputRequest

if TYPE_CHECKING:  # pragma: no cover
    from ..launching.ranks import Ranks

GATHER = 0.25  # seconds to let ranks that stop together arrive before choosing whom to serve
HANDOVER_AFTER = 1.0  # seconds the rank holding the floor may run without asking before others are served
IN_DEBUGGER = "in the debugger"
NO_STDIN = ("this notebook's frontend does not answer input requests (a kernel without stdin, e.g. nbclient or "
            "CI). Remove the breakpoint()/input() call, or run the cell from a notebook or console that supports "
            "input.")

Ask = Callable[[str], str]


class PromptServer:
    """One run's prompts (see the module docstring). ``ask(prompt) -> line`` defaults to ``input``."""

    def __init__(self, world: "Ranks", sink: EventSink, ask: Optional[Ask] = None) -> None:
        self.world = world
        self.sink = sink
        self._ask = ask
        self.waiting: Dict[int, InputRequest] = {}
        self.holder: Optional[int] = None
        self.mode = "serve"  # serve | abort | unavailable
        self._first_waiting: Optional[float] = None
        self._last_answer = 0.0
        self._debug_since: Optional[float] = None  # monotonic start of the current debugger session
        self._paused = 0.0
        self._resumed_at = 0.0  # wall clock (like the ranks' heartbeats) at the end of the last session
        self._announced: Set[Tuple[int, int]] = set()
        self._stepping_output = TextSink()  # the holder's own output, shown whatever the cell shows
        self._beats: Dict[int, Heartbeat] = {}  # each rank's latest heartbeat
        self.served: Set[int] = set()

    # -- what the run loop calls ----------------------------------------------------------------
    @property
    def debugging(self) -> bool:
        """Some rank is at a prompt, waits for one, or holds the floor."""
        return bool(self.waiting) or self.holder is not None

    def paused_seconds(self) -> float:
        """Seconds of this run spent with a rank in the debugger (the timeout does not count them)."""
        running = time.monotonic() - self._debug_since if self._debug_since is not None else 0.0
        return self._paused + running

    def observe(self, event: Any) -> Any:
        """Take prompt events in (returns ``None``); pass the rest on, heartbeats with the stall
        clock paused."""
        if isinstance(event, InputRequest):
            self._arrived(event)
            return None
        if isinstance(event, DebuggerLeft):
            self._show(event.rank, event.text)
            self._release(event.rank)
            return None
        if isinstance(event, Output) and event.rank == self.holder:
            self._stepping_output.handle(event)
            return None
        if isinstance(event, (TaskDone, TaskFailed, RankExited)):
            self.waiting.pop(event.rank, None)
            self._release(event.rank)
        elif isinstance(event, Heartbeat):
            return self._paused_heartbeat(event)
        return event

    def serve(self) -> None:
        """Ask for the next line if a rank may be served now (blocks in ``input()``)."""
        while self.mode == "serve" and self.waiting:
            now = time.monotonic()
            if self.holder is not None and self.holder not in self.waiting:
                if now - self._last_answer < HANDOVER_AFTER:
                    return  # the holder is stepping: it will ask again in a moment
                self._release(self.holder)
            if self.holder is None:
                if self._first_waiting is not None and now - self._first_waiting < GATHER:
                    return
                self._take_floor(min(self.waiting))
            self._answer(self.waiting.pop(self.holder))

    def abort(self) -> None:
        """The run is being interrupted: every rank waiting, now or later in this run, leaves its prompt."""
        self.mode = "abort"
        for request in list(self.waiting.values()):
            self._reply(request, abort=True)
        self.waiting.clear()
        for rank in [self.holder] if self.holder is not None else []:
            self._release(rank)

    # -- serving --------------------------------------------------------------------------------
    def _arrived(self, request: InputRequest) -> None:
        if self.mode == "abort":
            self._reply(request, abort=True)
            return
        if self.mode == "unavailable":
            self._reply(request, unavailable=NO_STDIN)
            return
        if not self.waiting and self.holder is None:
            self._first_waiting = time.monotonic()
        if self._debug_since is None:
            self._debug_since = time.monotonic()
        self.waiting[request.rank] = request
        self._set_state(request.rank, IN_DEBUGGER)

    def _take_floor(self, rank: int) -> None:
        self.holder = rank
        others = sorted(set(self.waiting) - {rank})
        if self.waiting[rank].debugger and (rank not in self.served or others):
            from ..live.ranks import format_ranks

            queue = f"; {format_ranks(others)} {'waits' if len(others) == 1 else 'wait'} their turn" if others else ""
            self._notice(f"rank {rank} is in the debugger{queue}")
        self.served.add(rank)

    def _answer(self, request: InputRequest) -> None:
        self._announce_waiting()
        self._show(request.rank, request.text)
        prompt = request.prompt if request.debugger else f"[rank {request.rank}] {request.prompt}"
        try:
            line = self._read_line(prompt)
        except KeyboardInterrupt:
            self.waiting[request.rank] = request
            self.abort()
            raise
        except EOFError:
            self._reply(request, eof=True)
        except (NotImplementedError, OSError, RuntimeError) as error:  # IPython's StdinNotImplementedError
            self._no_stdin(request, error)
            return
        else:
            self._reply(request, line=line)
        self._last_answer = time.monotonic()
        if not request.debugger:
            self._release(request.rank)

    def _read_line(self, prompt: str) -> str:
        self.sink.flush()
        sys.stdout.flush()
        ask = self._ask if self._ask is not None else builtins.input  # the kernel's, if it replaced input
        return ask(prompt)

    def _no_stdin(self, request: InputRequest, error: BaseException) -> None:
        self.mode = "unavailable"
        self._notice(f"rank {request.rank} waits for input ({request.prompt.strip() or 'a line'}), but "
                     f"{NO_STDIN} ({type(error).__name__}: {error})", level="warning")
        for waiting in [request, *self.waiting.values()]:
            self._reply(waiting, unavailable=NO_STDIN)
        self.waiting.clear()
        self._release(request.rank)

    def _release(self, rank: int) -> None:
        if self.holder == rank:
            self._stepping_output.flush()
            self.holder = None
            self._first_waiting = time.monotonic() if self.waiting else None
        if rank not in self.waiting:
            self._set_state(rank, "running", only_from=IN_DEBUGGER)
        if not self.debugging and self._debug_since is not None:
            self._paused += time.monotonic() - self._debug_since
            self._debug_since = None
            self._resumed_at = time.time()
            self._refresh_beats(self._resumed_at)

    # -- showing --------------------------------------------------------------------------------
    def _show(self, rank: int, text: str) -> None:
        """The debugger's output, each line tagged with its rank, in the cell (stdout)."""
        self._stepping_output.flush()
        if not text:
            return
        self.sink.flush()
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
        sys.stdout.write("".join(f"[rank {rank}] {line}\n" for line in lines))
        sys.stdout.flush()

    def _announce_waiting(self) -> None:
        """``rank 0 waits for rank 1 (in the debugger) in all_reduce #1 ...``, once per rank and collective,
        asked of the ranks themselves (their side threads answer at once)."""
        others = self.world.running()
        if not others:
            return
        try:
            replies = self.world.where(timeout=0.2)
        except Exception:  # noqa: BLE001 - an announcement only
            return
        for rank in others:
            reply = replies.get(rank)
            if reply is not None and reply.collective is not None:
                self._announce(rank, reply.collective)

    def _announce(self, rank: int, collective: Any) -> None:
        from ..live.ranks import format_ranks

        key = (rank, collective.seq)
        stopped = sorted(({self.holder} if self.holder is not None else set()) | set(self.waiting))
        if key in self._announced or not stopped or rank in stopped:
            return
        self._announced.add(key)
        self._notice(f"rank {rank} waits for {format_ranks(stopped)} ({IN_DEBUGGER}) in {collective.describe()}")

    def _paused_heartbeat(self, beat: Heartbeat) -> Optional[Heartbeat]:
        """A stall watchdog re-reads every rank's last collective on each heartbeat, so while a rank
        is in the debugger every rank's latest heartbeat is passed on anew, its collective entered
        "now"; afterwards collectives count from the end of the session."""
        self._beats[beat.rank] = beat
        if self.debugging:
            if beat.collective is not None:
                self._announce(beat.rank, beat.collective)
            self._refresh_beats(time.time())
            return None
        return _entered_after(beat, self._resumed_at)

    def _refresh_beats(self, floor: float) -> None:
        for rank in sorted(self._beats):
            self.sink.handle(_entered_after(self._beats[rank], floor))

    def _notice(self, text: str, level: str = "info") -> None:
        self.sink.handle(Notice(rank=-1, time=time.time(), text=text, level=level))

    # -- talking to ranks -----------------------------------------------------------------------
    def _reply(self, request: InputRequest, **answer: Any) -> None:
        self.world.answer(request.rank, InputReply(request_id=request.request_id, **answer))

    def _set_state(self, rank: int, state: str, only_from: Optional[str] = None) -> None:
        self.world.mark(rank, state, only_from)


def _entered_after(beat: Heartbeat, floor: float) -> Heartbeat:
    """``beat`` with its collective entered no earlier than ``floor`` (wall clock)."""
    if beat.collective is None or beat.collective.entered_at >= floor:
        return beat
    return replace(beat, collective=replace(beat.collective, entered_at=floor))
