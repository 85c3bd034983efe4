"""What the dashboard knows about a run: one :class:`RankView` per rank, fed by events.

Pure Python, no widgets: the dashboard renders it, tests read it. ``handle(event)`` is cheap
(it runs in the launcher's loop) and thread-safe; every change bumps ``version`` so a renderer
knows whether there is anything new to draw.

A rank's state is derived when asked (:meth:`DashboardModel.state`), so "for 3.1 s" keeps counting
between events; the states a rank went through are kept in ``RankView.history`` (consecutive
repeats once) for summaries and tests.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, List, Optional, Tuple

from .events import (
    CollectiveEntered, CollectiveExited, CollectiveState, Heartbeat, MemorySample, Metrics, Notice, Output,
    Progress, RankEvent, RankExited, RankReady, RankStarted, StartupFailed, TaskDone, TaskFailed, TaskStarted,
    barrier_name,
)

MAX_LINES = 500  # output lines kept per rank; older ones are counted, not kept
MAX_POINTS = 2000  # points kept per metric series (older ones thinned out)


def collective_label(state: CollectiveState, now: Optional[float] = None) -> str:
    """``at barrier 'save'`` for named barriers, else ``in all_reduce #17 (float32[4, 8]) for 3.1 s``."""
    name = barrier_name(state)
    if name is not None:
        text = f"at barrier {name!r}"
        return text + (f" for {max(0.0, now - state.entered_at):.1f} s" if now is not None else "")
    return "in " + state.describe(now)


@dataclass
class RankView:
    """Everything shown about one rank."""

    rank: int
    phase: str = "starting"  # starting | idle | running | done | failed | interrupted | stopped | dead
    pid: Optional[int] = None
    host: str = ""  # set for ranks on other hosts (a cluster's)
    collective: Optional[CollectiveState] = None
    last_collective: str = ""
    failure: str = ""
    exit_description: str = ""
    stopped_while: str = ""
    memory: Optional[MemorySample] = None
    rss_bytes: Optional[int] = None
    rss_peak_bytes: int = 0
    device_peak_bytes: Optional[int] = None
    lines: Deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LINES))
    dropped_lines: int = 0
    partial: Dict[str, str] = field(default_factory=dict)
    progress: Dict[int, Progress] = field(default_factory=dict)
    history: List[str] = field(default_factory=list)
    output_version: int = 0

    @property
    def last_line(self) -> str:
        """The latest line the rank wrote (a line still being written counts)."""
        for stream in ("stderr", "stdout"):
            text = self.partial.get(stream, "")
            if text.strip():
                return text
        return self.lines[-1] if self.lines else ""

    @property
    def current_progress(self) -> Optional[Progress]:
        """The bar drawn most recently, open bars first."""
        if not self.progress:
            return None
        bars = sorted(self.progress.values(), key=lambda p: (not p.closed, p.time))
        return bars[-1]

    def output_lines(self) -> List[str]:
        """Kept lines plus the line being written, if any."""
        pending = [text for text in self.partial.values() if text]
        return [*self.lines, *pending]


class DashboardModel:
    """The state of a run's ranks (see the module docstring)."""

    def __init__(self, ranks: Iterable[int], max_lines: int = MAX_LINES) -> None:
        self.ranks = sorted(ranks)
        self.max_lines = max_lines
        self.views: Dict[int, RankView] = {r: RankView(r, lines=deque(maxlen=max_lines)) for r in self.ranks}
        self.series: Dict[str, List[Tuple[float, float]]] = {}
        self.metrics_rank: Optional[int] = None
        self.notices: List[Notice] = []
        self.started_at = time.time()
        self.ended_at: Optional[float] = None
        self.version = 0
        self.series_version = 0
        self.tracing = False  # per-collective events seen: heartbeats' collective is then older news
        self._lock = threading.RLock()
        self._step_counter = 0

    # -- feeding ---------------------------------------------------------------------------------
    def handle(self, event: RankEvent) -> None:
        with self._lock:
            if isinstance(event, Notice):
                self.notices.append(event)
                self.version += 1
                return
            view = self.views.get(event.rank)
            if view is None:
                return
            self._apply(view, event)
            self.version += 1
            view_state = self.state(view.rank)
            if not view.history or view.history[-1] != view_state:
                view.history.append(view_state)

    def _apply(self, view: RankView, event: RankEvent) -> None:
        if isinstance(event, Output):
            self._add_output(view, event.stream, event.text)
        elif isinstance(event, CollectiveEntered):
            self.tracing = True
            view.collective = event.state
            view.last_collective = collective_label(event.state)
        elif isinstance(event, CollectiveExited):
            if view.collective is not None and view.collective.seq == event.seq:
                view.collective = None
        elif isinstance(event, Heartbeat):
            view.rss_bytes = event.rss_bytes
            view.rss_peak_bytes = max(view.rss_peak_bytes, event.rss_bytes)
            if not self.tracing:
                view.collective = event.collective if event.in_task else None
                if event.collective is not None:
                    view.last_collective = collective_label(event.collective)
        elif isinstance(event, MemorySample):
            view.memory = event
            view.rss_bytes = event.rss_bytes
            view.rss_peak_bytes = max(view.rss_peak_bytes, event.rss_peak_bytes, event.rss_bytes)
            if event.peak_allocated_bytes is not None:
                view.device_peak_bytes = max(view.device_peak_bytes or 0, event.peak_allocated_bytes)
        elif isinstance(event, Progress):
            view.progress[event.bar] = event
            if len(view.progress) > 8:  # many short bars: keep the latest few
                for bar in sorted(view.progress, key=lambda b: view.progress[b].time)[:-8]:
                    del view.progress[bar]
        elif isinstance(event, Metrics):
            self._add_metrics(event)
        elif isinstance(event, RankStarted):
            view.pid = event.pid
            view.host = getattr(event, "host", "")
        elif isinstance(event, RankReady):
            view.phase = "idle"
        elif isinstance(event, TaskStarted):
            view.phase, view.failure, view.collective = "running", "", None
        elif isinstance(event, TaskDone):
            view.phase, view.collective = "done", None
        elif isinstance(event, TaskFailed):
            view.phase = "interrupted" if event.interrupted else "failed"
            view.failure = event.failure.summary
            view.collective = None
        elif isinstance(event, StartupFailed):
            view.phase, view.failure = "failed", event.failure.summary
        elif isinstance(event, RankExited):
            if not event.expected:  # the run loop counts it as a death (it ended before answering)
                view.phase, view.exit_description = "dead", event.description
            elif view.phase in ("running", "starting"):  # ended by the launcher after another rank failed or died
                view.phase = "stopped"
            view.collective = None

    def _add_output(self, view: RankView, stream: str, text: str) -> None:
        pending = view.partial.get(stream, "") + text
        *complete, rest = pending.split("\n")
        for line in complete:
            line = _after_carriage_return(line)
            if len(view.lines) == view.lines.maxlen:
                view.dropped_lines += 1
            view.lines.append(line)
        view.partial[stream] = _after_carriage_return(rest)
        view.output_version += 1

    def _add_metrics(self, event: Metrics) -> None:
        if self.metrics_rank is None or event.rank < self.metrics_rank:
            if self.metrics_rank is not None and event.rank < self.metrics_rank:
                self.series.clear()
            self.metrics_rank = event.rank
        if event.rank != self.metrics_rank:
            return
        self.series_version += 1
        for step, values in event.points:
            self._step_counter += 1
            x = float(step) if step is not None else float(self._step_counter)
            for name, value in values.items():
                points = self.series.setdefault(name, [])
                points.append((x, value))
                if len(points) > MAX_POINTS:
                    del points[::2]

    def flush(self) -> None:
        """Nothing to flush: with ``handle`` this makes the model an :class:`~.sinks.EventSink` itself."""

    def finish(self) -> None:
        """The run is over: stop the clock; a rank that never answered was stopped by the launcher
        (its state says what it was doing: ``stopped while at barrier 'x' for 3.0 s``)."""
        with self._lock:
            self.ended_at = time.time()
            for view in self.views.values():
                if view.phase in ("running", "starting"):  # no answer when the run ended: the launcher stopped it
                    doing = self.state(view.rank, self.ended_at)
                    view.phase, view.stopped_while = "stopped", "" if doing in ("running", "starting") else doing
                view.collective = None
                if view.history[-1:] != [self.state(view.rank)]:
                    view.history.append(self.state(view.rank))
            self.version += 1

    # -- reading ---------------------------------------------------------------------------------
    def state(self, rank: int, now: Optional[float] = None) -> str:
        """The rank's state as the table shows it."""
        with self._lock:
            view = self.views[rank]
            if view.phase == "failed":
                return f"failed: {view.failure}" if view.failure else "failed"
            if view.phase == "dead":
                return f"dead: {view.exit_description}" if view.exit_description else "dead"
            if view.phase == "interrupted":
                return "interrupted"
            if view.phase == "stopped" and view.stopped_while:
                return f"stopped while {view.stopped_while}"
            if view.phase == "running" and view.collective is not None:
                return collective_label(view.collective, now)
            return view.phase

    def is_bad(self, rank: int) -> bool:
        return self.views[rank].phase in ("failed", "dead")

    @property
    def duration(self) -> float:
        return (self.ended_at or time.time()) - self.started_at

    def lock(self) -> "threading.RLock":
        return self._lock


def _after_carriage_return(line: str) -> str:
    """What a terminal shows of ``line``: the text after its last carriage return (tqdm redraws)."""
    line = line.rstrip("\r")
    return line.rsplit("\r", 1)[-1] if "\r" in line else line
