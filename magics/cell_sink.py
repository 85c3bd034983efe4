"""In the notebook: where a running cell's events go, and the stall watchdog.

:class:`CellSink` is the pool's event sink while a ``%%fabric`` cell runs (it is called from the
notebook's main thread, so what it prints lands in the running cell):

- rank output: the chosen ranks' stdout/stderr, prefixed ``[rank N]``, as it arrives
  (:class:`~notebook_fabric.live.sinks.TextSink`); other ranks' output is counted, not shown;
- launcher notices: ``[notebook-fabric] ...`` on stderr;
- heartbeats: every rank reports its current collective; when some ranks have waited in a
  collective for ``stall_after`` seconds that other ranks have not entered, the watchdog asks every
  rank where it is (``pool.where``, answered by the ranks' control threads even while stuck) and
  prints who waits where and the stacks of the others, once per stall. The last report is kept
  for ``%fabric where``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

from notebook_fabric.launch.errors import format_ranks
from notebook_fabric.live.events import CollectiveState, Heartbeat, Notice, Output, RankEvent
from notebook_fabric.live.sinks import TextSink

from .render import format_stacks


@dataclass(frozen=True)
class StallReport:
    """What the watchdog saw: who waits in which collective, and every rank's stack."""

    time: float
    text: str
    stacks: Dict[int, str]


class CellSink:
    """The event sink of one cell (see the module docstring)."""

    def __init__(self, show: Optional[Iterable[int]], running: Iterable[int], *,
                 where: Callable[[float], Dict[int, str]], stall_after: Optional[float]) -> None:
        self._text = TextSink(ranks=show)
        self.show = None if show is None else set(show)
        self.running = sorted(running)
        self._where = where
        self.stall_after = stall_after if stall_after and stall_after > 0 else None
        self._collectives: Dict[int, Optional[CollectiveState]] = {}
        self._reported: set = set()
        self.hidden_output: Dict[int, int] = {}
        self.stall_report: Optional[StallReport] = None
        self.notices: List[str] = []
        self._wrote = False

    def handle(self, event: RankEvent) -> None:
        if isinstance(event, Output) and self.show is not None and event.rank not in self.show:
            self.hidden_output[event.rank] = self.hidden_output.get(event.rank, 0) + event.text.count("\n")
            return
        if isinstance(event, Heartbeat):
            self._collectives[event.rank] = event.collective if event.in_task else None
            self._check_stall(time.time())
            return
        if isinstance(event, Notice):
            self.notices.append(event.text)
        self._wrote = True
        self._text.handle(event)

    def flush(self) -> None:
        """Print held partial lines and flush the streams, if the cell printed anything (a kernel's
        stream flush is a round trip to its I/O thread: not worth paying for nothing)."""
        if self._wrote:
            self._text.flush()

    # -- the watchdog ---------------------------------------------------------------------------
    def _check_stall(self, now: float) -> None:
        if self.stall_after is None:
            return
        waiting = {r: c for r, c in self._collectives.items() if c is not None and now - c.entered_at >= self.stall_after}
        if not waiting:
            return
        first = min(waiting.values(), key=lambda c: c.entered_at)
        key = (first.op, first.seq)
        if key in self._reported:
            return
        together = [r for r, c in self._collectives.items() if c is not None and (c.op, c.seq) == key]
        if set(together) >= set(self.running):
            return  # everyone is in it: slow, not stalled
        self._reported.add(key)
        self._report(now, key)

    def _report(self, now: float, key: Any) -> None:
        stacks = self._where(2.0)
        waiting: Dict[str, List[int]] = {}
        for rank, collective in sorted(self._collectives.items()):
            if collective is not None:
                waiting.setdefault(collective.describe(now), []).append(rank)
        lines = [f"stall: {format_ranks(ranks)} {'has' if len(ranks) == 1 else 'have'} waited in {label}"
                 for label, ranks in waiting.items()]
        elsewhere = [r for r in self.running if self._collectives.get(r) is None]
        if elsewhere:
            lines.append(f"{format_ranks(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} not in that collective; "
                         "every rank's stack:")
        text = "\n".join(lines + ["  " + line for line in format_stacks(stacks).splitlines()])
        self.stall_report = StallReport(time=now, text=text, stacks=stacks)
        self.flush()
        self._wrote = True
        sys.stderr.write("".join(f"[notebook-fabric] {line}\n" for line in text.splitlines()))
        sys.stderr.write("[notebook-fabric] (interrupt the kernel to stop the cell; --stall 0 turns this report off)\n")

