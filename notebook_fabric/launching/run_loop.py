"""Waiting for a pool: until every rank is ready, and until a task finished on every chosen rank.

The waiting happens in the caller's thread (a notebook cell), so the events' output prints in
the cell and a kernel interrupt arrives here as KeyboardInterrupt. Policy on trouble:

- a rank raised: wait ``failure_grace`` seconds for the others (identical failures are grouped),
  then re-raise; ranks still busy are interrupted (``recover``) or left to the caller's stop;
- a rank died: collect other deaths for a moment, stop the pool, raise :class:`RankDiedError`;
- ``timeout`` passed: ask every rank where it is, then raise :class:`LaunchTimeoutError` naming
  the ranks waiting in a collective and the stacks of the others;
- the caller was interrupted: SIGINT to busy ranks, wait ``interrupt_grace``, stop the pool if
  some do not stop (a second interrupt stops it at once), re-raise KeyboardInterrupt;
- a rank waits at a prompt (``breakpoint()``, ``input()``): the loop's
  :class:`~notebook_fabric.stepping.prompt_server.PromptServer` asks here; meanwhile the timeout
  does not run and failures of other ranks are not settled.
"""
from __future__ import annotations

import dataclasses
import pickle
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..live.events import (
    LedgerSnapshot, Notice, RankExited, RankReady, RemoteFailure, StartupFailed, TaskDone, TaskFailed, TaskStarted,
    WhereReply,
)
from ..live.sinks import EventSink
from ..stepping.prompt_server import PromptServer
from .errors import (
    LaunchTimeoutError, RankDiedError, format_ranks, rebuild_exception,
)
from .hang import CollectiveHangError, check_waiting, explain_failures, task_label, torch_debug_note, waiting_note
from .outcome import RunOutcome
from .frames import LAUNCH_DIR, innermost_user_frame

if TYPE_CHECKING:  # pragma: no cover
    from .ranks import Ranks

HANG_CHECK_EVERY = 0.25  # seconds between looks at the waiting ranks once some rank finished the task
DEATH_GRACE = 0.3  # seconds to gather ranks that die together ("ranks 0-1 exited with code 3")
EXIT_EVENT_WAIT = 3.0  # at most this long past failure_grace for the exit event of a rank already gone


def wait_until_ready(world: "Ranks", sink: EventSink, timeout: float) -> None:
    """Block until every rank sent ``RankReady`` (other events go to ``sink``); raise what went wrong otherwise."""
    pending = set(range(world.world_size))
    failures: Dict[int, RemoteFailure] = {}
    arrival: List[int] = []
    deaths: Dict[int, RankExited] = {}
    deadline = time.monotonic() + timeout
    first_problem: Optional[float] = None
    while pending:
        now = time.monotonic()
        if first_problem is not None and now - first_problem > 1.0:
            break
        if now > deadline:
            raise _start_timeout(world, sorted(pending), timeout)
        event = world.select(0.05)
        if event is None:
            continue
        if isinstance(event, RankReady):
            pending.discard(event.rank)
        elif isinstance(event, StartupFailed):
            failures[event.rank] = event.failure
            arrival.append(event.rank)
            pending.discard(event.rank)
            first_problem = first_problem or now
        elif isinstance(event, RankExited):
            if event.rank not in failures:
                deaths[event.rank] = event
                first_problem = first_problem or now
            pending.discard(event.rank)
        else:
            sink.handle(event)
    if failures:
        exc = rebuild_exception(failures, arrival)
        _note(exc, "while starting the rank (building Fabric and joining the process group)")
        raise exc
    if deaths:
        raise _death_error(deaths, "while starting")


def _start_timeout(world: "Ranks", pending: List[int], timeout: float) -> LaunchTimeoutError:
    """The start-up error: ranks that never reached the notebook apart from those that did but never
    got their Fabric ready (the process group never formed, or building the Fabric hangs)."""
    silent = world.never_connected(pending)
    joining = [r for r in pending if r not in silent]
    lines = [f"the ranks were not ready within timeout={timeout:g} s of starting:"]
    if silent:
        pids = ", ".join(str(world.pid(r)) for r in silent)
        verb = "has" if len(silent) == 1 else "have"
        lines.append(f"  {format_ranks(silent)} never connected to the notebook (pid {pids}): the process {verb} not "
                     "come this far (still starting Python, importing, or stopped)")
    if joining:
        lines.append(f"  {format_ranks(joining)} connected but never joined the process group (building the Fabric or "
                     "in init_process_group, waiting for the other ranks)")
    return LaunchTimeoutError("\n".join(lines), waiting={}, elsewhere={}, stacks={}, never_connected=silent,
                              not_joined=joining)


class RunLoop:
    """One task on a set of ranks, from sending it to its outcome (see the module docstring)."""

    def __init__(self, world: "Ranks", ranks: List[int], sink: EventSink, *, timeout: Optional[float],
                 recover: bool, failure_grace: float, interrupt_grace: float, last: bool = False,
                 sent_as: Optional[int] = None) -> None:
        """``sent_as``: the task went out already with the pool's start, under this id (``Ranks.arm_task``)."""
        self.world = world  # every rank of the pool, through the narrow Ranks verbs
        self.ranks = ranks  # the ranks this task runs on
        self.sink = sink
        self.timeout = timeout
        self.recover = recover
        self.failure_grace = failure_grace
        self.interrupt_grace = interrupt_grace
        self.last = last
        self.task_id = 0
        self.pending = set(ranks)
        self.results: Dict[int, Any] = {}
        self.failures: Dict[int, RemoteFailure] = {}
        self.arrival: List[int] = []
        self.interrupted: List[int] = []
        self.deaths: Dict[int, RankExited] = {}
        self._we_interrupted = False
        self.prompts = PromptServer(world, sink)  # ranks at breakpoint()/input(): asked here, one at a time
        self._label = "the task"
        self._hang_check_at: Optional[float] = None
        self._idle = sorted(set(range(world.world_size)) - set(ranks))  # not running this task (--ranks)
        self._hang: Optional[CollectiveHangError] = None
        self._failure_story: Optional[str] = None
        self._sent_as = sent_as

    def run(self, task: Any) -> Dict[int, Any]:
        try:
            return self._run(task)
        except BaseException:
            self.world.keep_logs()  # the logs of a failed run are kept
            raise

    def _run(self, task: Any) -> Dict[int, Any]:
        self._label = task_label(task)
        if self._sent_as is not None:  # sent with the start: its events may be queued already, keep them
            self.task_id = self._sent_as
        else:
            payload = pickle_task(task)
            self.world.drain(self.sink)
            for rank in self.ranks:  # between tasks only the latest heartbeat is kept: hand it over first
                beat = self.world.heartbeat(rank)
                if beat is not None:
                    self.sink.handle(beat)
            self.task_id = self.world.begin_task(self.ranks, payload, exit_after=self.last)
        for rank in self.ranks:
            self.sink.handle(TaskStarted(rank=rank, time=time.time(), task_id=self.task_id))
        self.world.watch_task(True)
        if self._idle:  # a collective needing an idle rank can never complete: watch from the start
            self._hang_check_at = time.monotonic() + HANG_CHECK_EVERY
        try:
            outcome = self._wait()
        except KeyboardInterrupt:
            self.world.keep_logs()  # before anything stops the pool: a failed run's logs are kept
            self._on_interrupt()
            raise
        finally:
            self.world.watch_task(False)
            self.world.drain(self.sink)
            self.sink.flush()
        if outcome != "done" or self.failures:
            self.world.keep_logs()
        if outcome == "died":
            self._on_death()
        if outcome == "timeout":
            self._on_timeout()
        if outcome == "hang" and self._hang is not None:
            self.world.end(grace=0.2)  # the waiting ranks sit in the backend's wait: no interrupt reaches them
            raise self._hang
        if self.failures:
            error = self._hang_from_failures() or rebuild_exception(self.failures, self.arrival)
            if self._failure_story:
                _note(error, self._failure_story)
            self._note_waiting(error)
            self._settle_stragglers()
            raise error
        return {rank: self.results[rank] for rank in self.ranks}

    def outcome(self, task: Any) -> RunOutcome:
        """Run ``task`` like :meth:`run`, but return the per-rank record instead of raising."""
        record = RunOutcome(ranks=list(self.ranks))
        try:
            record.values = self.run(task)
        except BaseException as error:  # KeyboardInterrupt included: the caller renders it
            record.error = error
            record.values = {rank: self.results[rank] for rank in self.ranks if rank in self.results}
        record.failures, record.arrival = dict(self.failures), list(self.arrival)
        record.interrupted = list(self.interrupted)
        record.unfinished = sorted(self.pending)
        record.deaths = self.world.deaths(self.deaths)
        record.ledgers = dict(self.world.ledgers)
        return record

    # -- waiting --------------------------------------------------------------------------------
    def _wait(self, until: Optional[float] = None, settle_on_failure: bool = True) -> str:
        started = time.monotonic()
        first_failure: Optional[float] = None
        while self.pending:
            now = time.monotonic()
            if self.deaths:
                return "died"
            if until is not None and now > until:
                return "grace"
            if self.failures and settle_on_failure and not self.prompts.debugging:
                first_failure = first_failure or now
                # a rank whose process is gone explains the others' "connection closed": wait for its exit event
                waiting_for_exit = self._pending_rank_exited() and now - first_failure < self.failure_grace + EXIT_EVENT_WAIT
                if now - first_failure > self.failure_grace and not waiting_for_exit:
                    return "failed"
            if self.timeout is not None and now - started - self.prompts.paused_seconds() > self.timeout:
                return "timeout"
            event = self.prompts.observe(self.world.select(0.05))
            if event is not None:
                self._dispatch(event)
            self.prompts.serve()
            if (self._hang_check_at is not None and self.pending and not self.prompts.debugging
                    and time.monotonic() >= self._hang_check_at):
                self._hang_check_at = time.monotonic() + HANG_CHECK_EVERY
                if self._certain_hang():
                    return "hang"
        return "died" if self.deaths else "done"

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, LedgerSnapshot):
            self.world.ledgers[event.rank] = event.entries
            return
        if isinstance(event, (TaskDone, TaskFailed)):
            self.sink.handle(event)  # the dashboard marks ranks done, failed
        elif isinstance(event, RankExited):  # dead when this loop counts it as a death (even under `last`)
            died = event.rank in self.pending or not event.expected
            self.sink.handle(dataclasses.replace(event, expected=False) if died else event)
        if isinstance(event, TaskDone) and event.task_id == self.task_id and event.rank in self.pending:
            self.pending.discard(event.rank)
            self._hang_check_at = self._hang_check_at or time.monotonic() + 0.1
            try:
                self.results[event.rank] = pickle.loads(event.payload)
            except Exception as error:
                self._fail(event.rank, RemoteFailure(
                    type_name=type(error).__name__, module=type(error).__module__,
                    message=f"the value returned on rank {event.rank} cannot be unpickled in the notebook: {error}",
                    traceback=""))
        elif isinstance(event, TaskFailed) and event.task_id == self.task_id and event.rank in self.pending:
            self.pending.discard(event.rank)
            if event.interrupted:
                self.interrupted.append(event.rank)
                if self._we_interrupted:  # the consequence of our own interrupt: say where it stopped
                    frame = innermost_user_frame(event.failure.traceback)
                    self._notice(f"rank {event.rank} interrupted" + (f" at {frame}" if frame else ""))
                    return
            self._fail(event.rank, event.failure)
        elif isinstance(event, RankExited):
            if event.rank in self.pending or not event.expected:  # an exit before answering is a death
                self.deaths[event.rank] = event
                self.pending.discard(event.rank)
        elif isinstance(event, (TaskDone, TaskFailed)):
            pass  # a late answer to an earlier, abandoned task
        else:
            self.sink.handle(event)

    def _certain_hang(self) -> bool:
        """Do pending ranks wait in a collective that a finished (or idle) rank never issued?"""
        self._hang = check_waiting(self.world, self.pending, self.results, self._idle, self._label)
        return self._hang is not None

    def _hang_from_failures(self) -> Optional[CollectiveHangError]:
        error, self._failure_story = explain_failures(self.world, self.failures, self.results, self._label)
        return error

    def _note_waiting(self, error: BaseException) -> None:
        note = waiting_note(self.world, self.pending)
        if note:
            _note(error, note)

    def _pending_rank_exited(self) -> bool:
        return any(self.world.has_exited(rank) for rank in self.pending)

    def _fail(self, rank: int, failure: RemoteFailure) -> None:
        self.failures[rank] = failure
        self.arrival.append(rank)

    # -- trouble --------------------------------------------------------------------------------
    def _on_interrupt(self) -> None:
        """The caller was interrupted: interrupt the busy ranks; stop the pool if they stay busy."""
        busy = sorted(self.pending)
        self._we_interrupted = True
        self.prompts.abort()
        self.world.interrupt(busy)
        try:
            self._wait(until=time.monotonic() + self.interrupt_grace, settle_on_failure=False)
        except KeyboardInterrupt:  # a second interrupt: stop now
            pass
        if self.pending or self.deaths or not self.recover:
            stuck = sorted(self.pending)
            if stuck:
                verb = "was" if len(stuck) == 1 else "were"
                self._notice(f"interrupted; {format_ranks(stuck)} did not stop within "
                             f"{self.interrupt_grace:g} s{self._collective_hint(stuck)} and {verb} terminated")
            self.world.end(grace=0.2)

    def _on_death(self) -> None:
        deadline = time.monotonic() + DEATH_GRACE
        while time.monotonic() < deadline:
            event = self.world.select(0.05)
            if event is not None:
                self._dispatch(event)
        survivors = self.world.living()
        error = _death_error(self.deaths, "while running the task")
        self._note_waiting(error)
        advice = torch_debug_note("".join(event.last_words for event in self.deaths.values()))
        if advice:
            _note(error, advice)
        self.world.end(grace=0.2)
        if survivors:
            _note(error, f"the other ranks ({format_ranks(survivors)}) were stopped")
        if self.failures:
            _note(error, "meanwhile on the other ranks: "
                  + "; ".join(f"rank {r}: {f.summary}" for r, f in sorted(self.failures.items())))
        raise error

    def _on_timeout(self) -> None:
        replies: Dict[int, WhereReply] = self.world.where(timeout=2.0)
        now = time.time()
        waiting = {r: replies[r].collective for r in sorted(self.pending) if r in replies and replies[r].collective}
        elsewhere = {r: replies[r].stack for r in sorted(self.pending) if r in replies and not replies[r].collective}
        silent = [r for r in sorted(self.pending) if r not in replies]
        lines = [f"the task did not finish within timeout={self.timeout:g} s on {format_ranks(sorted(self.pending))}"]
        by_collective: Dict[str, List[int]] = {}
        for rank, state in waiting.items():
            by_collective.setdefault(f"{state.op} #{state.seq}", []).append(rank)
        for label, ranks in by_collective.items():
            since = max(now - waiting[r].entered_at for r in ranks)
            verb = "waits" if len(ranks) == 1 else "wait"
            lines.append(f"  {format_ranks(ranks)} {verb} in {waiting[ranks[0]].describe()} (for {since:.1f} s)")
        for rank, stack in elsewhere.items():
            last = [line for line in stack.splitlines() if line.strip()][-2:]
            lines.append(f"  rank {rank} is elsewhere, not in a collective:\n      " + "\n      ".join(l.strip() for l in last))
        if silent:
            lines.append(f"  {format_ranks(silent)} did not answer (busy in native code?)")
        finished = sorted(set(self.ranks) - self.pending)
        if finished:
            lines.append(f"  {format_ranks(finished)} finished")
        stacks = {r: reply.stack for r, reply in replies.items()}
        error = LaunchTimeoutError("\n".join(lines), waiting=waiting, elsewhere=elsewhere, stacks=stacks)
        self._settle_stragglers()
        raise error

    def _settle_stragglers(self) -> None:
        """After a failure or timeout: interrupt ranks still busy (``recover``), else leave them to stop()."""
        if not self.pending:
            return
        if not self.recover:
            self.world.end(grace=0.2)
            return
        self._we_interrupted = True
        self.prompts.abort()
        self.world.interrupt(sorted(self.pending))
        try:
            outcome = self._wait(until=time.monotonic() + self.interrupt_grace, settle_on_failure=False)
        except KeyboardInterrupt:
            outcome = "interrupted"
        if outcome != "done":
            self.world.end(grace=0.2)

    def _collective_hint(self, ranks: List[int]) -> str:
        """``" (rank 0 in barrier #3)"``: asked of the ranks themselves (their side thread answers); a
        rank too busy to answer in time is described by its last heartbeat."""
        try:
            replies = self.world.where(timeout=0.5)
        except Exception:  # noqa: BLE001 - a hint only
            replies = {}
        described = []
        for rank in ranks:
            beat = self.world.heartbeat(rank)
            state = replies[rank].collective if rank in replies else (beat.collective if beat is not None else None)
            if state is not None:
                described.append(f"rank {rank} in {state.describe()}")
        return f" ({'; '.join(described)})" if described else ""

    def _notice(self, text: str) -> None:
        self.sink.handle(Notice(rank=-1, time=time.time(), text=text, level="warning"))


def pickle_task(task: Any) -> bytes:
    """The task as ranks receive it (cloudpickle); a ``TypeError`` that says why when it cannot be."""
    from notebook_fabric.utilities import by_value

    try:
        return by_value.dumps(task)
    except Exception as error:
        raise TypeError(f"the task {task!r} cannot be sent to the ranks: cloudpickle fails with "
                        f"{type(error).__name__}: {error}") from error


def exit_error(exits: Dict[int, RankExited]) -> RankDiedError:
    """The error for ranks that crashed on their way out, after every rank had answered."""
    return _death_error(exits, "after returning its value (on its way out)")


def _death_error(deaths: Dict[int, RankExited], when: str) -> RankDiedError:
    groups: Dict[str, List[int]] = {}
    for rank, event in sorted(deaths.items()):
        groups.setdefault(event.description, []).append(rank)
    parts = [f"{format_ranks(ranks)} {description}" for description, ranks in groups.items()]
    first = min(deaths)
    message = "; ".join(parts) + f" {when}, without raising an exception"
    for rank, event in sorted(deaths.items()):
        if event.last_words.strip():
            message += f"\n\nrank {rank}, as it crashed (faulthandler):\n{_trim_crash_report(event.last_words)}"
    return RankDiedError(message, rank=first, exitcode=deaths[first].exitcode, ranks=sorted(deaths))


def _trim_crash_report(text: str) -> str:
    """faulthandler's stack, most recent call first, cut where the launcher's own frames begin."""
    kept = []
    for line in text.rstrip().splitlines():
        if line.strip().startswith(f'File "{LAUNCH_DIR}'):
            kept.append("  ...")
            break
        kept.append(line)
    return "\n".join(kept)


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(text)
