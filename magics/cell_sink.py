"""In the notebook: where a running cell's events go, and the stall watchdog.

:class:`CellSink` is the pool's event sink while a ``%%fabric`` cell runs (it is called from the
notebook's main thread, so what it prints lands in the running cell):

- rank output: the chosen ranks' stdout/stderr, prefixed ``[rank N]``, as it arrives
  (:class:`~notebook_fabric.live.sinks.TextSink`); other ranks' output is counted, not shown;
- launcher notices: ``[notebook-fabric] ...`` (informational ones on stdout in a kernel, warnings on
  stderr: :mod:`notebook_fabric.live.notices`);
- heartbeats: every rank reports its current collective; when some ranks have waited in a
  collective for ``stall_after`` seconds that other ranks have not entered, the watchdog asks every
  rank where it is (``pool.where``, answered by the ranks' control threads even while stuck) and
  prints who waits where and the stacks of the others, once per stall. The last report is kept
  for ``%fabric where``.

With a ``dashboard`` (the live widget sink, default in a notebook), every event goes to it
instead of the text printer: it shows every rank, so nothing is counted as hidden.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

from notebook_fabric.live.events import Heartbeat, Notice, Output, RankEvent
from notebook_fabric.live.sinks import EventSink, TextSink
from notebook_fabric.live.stall import StallReport, StallWatchdog, StallWatchdogSink

from .render import format_stacks


class CellSink:
    """The event sink of one cell (see the module docstring)."""

    def __init__(self, show: Optional[Iterable[int]], running: Iterable[int], *,
                 where: Callable[[float], Dict[int, str]], stall_after: Optional[float],
                 dashboard: Optional[EventSink] = None, hosts: Optional[Dict[int, str]] = None) -> None:
        self._text: EventSink = dashboard if dashboard is not None else TextSink(ranks=show)
        self.dashboard = dashboard
        self.show = None if show is None else set(show)
        self._stall = StallWatchdogSink(self._text, StallWatchdog(running, where, stall_after, format_stacks=format_stacks,
                                                                      hosts=hosts),
                                        hint="interrupt the kernel to stop the cell; --stall 0 turns this report off",
                                        on_report=self._reported)
        self.hidden_output: Dict[int, int] = {}
        self.stall_report: Optional[StallReport] = None
        self.notices: List[str] = []
        self._wrote = False

    def handle(self, event: RankEvent) -> None:
        if isinstance(event, Notice):
            self.notices.append(event.text)
        if self.dashboard is None:
            if not isinstance(event, (Output, Heartbeat, Notice)):
                return  # task, collective and memory events are for the dashboard
            if isinstance(event, Output) and self.show is not None and event.rank not in self.show:
                self.hidden_output[event.rank] = self.hidden_output.get(event.rank, 0) + event.text.count("\n")
                return
            if not isinstance(event, Heartbeat):
                self._wrote = True
        self._stall.handle(event)  # heartbeats feed the stall watchdog, then go on (the text printer drops them)

    def _reported(self, report: StallReport) -> None:
        self.stall_report = report
        self._wrote = True

    def flush(self) -> None:
        """Print held partial lines and flush the streams, if the cell printed anything (a kernel's
        stream flush is a round trip to its I/O thread: not worth paying for nothing)."""
        if self._wrote:
            self._text.flush()
