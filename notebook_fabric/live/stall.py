"""The stall watchdog: some ranks wait in a collective that the others have not entered.

Fed the ranks' heartbeats (each carries the rank's current collective), it notices when some
running ranks have waited ``stall_after`` seconds in a collective that not every running rank is
in, asks every rank where it is (``where``: answered by the ranks' control threads even while their
main thread is stuck), and returns a report naming who waits where, with every rank's stack. Once
per stall. Used by ``launch(fn)`` (:class:`StallWatchdogSink`) and by the ``%%fabric`` cell sink.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional

from .events import CollectiveState, Heartbeat, RankEvent
from .fold import fold_frames
from .notices import write_notice
from .ranks import format_ranks, format_ranks_on
from .sinks import EventSink


@dataclass(frozen=True)
class StallReport:
    """What the watchdog saw: who waits in which collective, and every rank's stack."""

    time: float
    text: str
    stacks: Dict[int, str]


def plain_stacks(stacks: Dict[int, str], clean: Callable[[str], str] = fold_frames,
                 label: Callable[[List[int]], str] = format_ranks) -> str:
    """Every rank's stack, one indented block per group of ranks whose ``clean``-ed stacks are the same,
    headed by ``label(ranks)``."""
    groups: Dict[str, List[int]] = {}
    for rank, stack in sorted(stacks.items()):
        groups.setdefault(clean(stack).rstrip(), []).append(rank)
    return "\n".join(
        f"{label(ranks)}:\n" + ("\n".join("    " + line for line in stack.splitlines()) or "    (empty)")
        for stack, ranks in groups.items()
    )


class StallWatchdog:
    """See the module docstring. ``where(timeout) -> {rank: stack}``; ``hosts``: rank -> host, for ranks on
    other hosts (the report then names each rank's host)."""

    def __init__(self, running: Iterable[int], where: Callable[[float], Dict[int, str]], stall_after: Optional[float],
                 format_stacks: Callable[[Dict[int, str]], str] = plain_stacks,
                 hosts: Optional[Mapping[int, str]] = None) -> None:
        self.running = sorted(running)
        self.hosts = dict(hosts or {})
        self.stall_after = stall_after if stall_after and stall_after > 0 else None
        self._where = where
        self._format_stacks = format_stacks
        self._collectives: Dict[int, Optional[CollectiveState]] = {}
        self._reported: set = set()

    def observe(self, heartbeat: Heartbeat) -> Optional[StallReport]:
        """Take in one heartbeat; a report when it reveals a new stall."""
        self._collectives[heartbeat.rank] = heartbeat.collective if heartbeat.in_task else None
        if self.stall_after is None:
            return None
        now = time.time()
        waiting = [c for c in self._collectives.values() if c is not None and now - c.entered_at >= self.stall_after]
        if not waiting:
            return None
        first = min(waiting, key=lambda c: c.entered_at)
        key = (first.op, first.seq)
        together = [r for r, c in self._collectives.items() if c is not None and (c.op, c.seq) == key]
        if key in self._reported or set(together) >= set(self.running):
            return None  # reported already, or everyone is in it: slow, not stalled
        self._reported.add(key)
        return self._report(now)

    def _report(self, now: float) -> StallReport:

        stacks = self._where(2.0)
        waiting: Dict[str, List[int]] = {}
        for rank, collective in sorted(self._collectives.items()):
            if collective is not None:
                waiting.setdefault(collective.describe(now), []).append(rank)
        lines = [f"stall: {format_ranks_on(ranks, self.hosts)} {'has' if len(ranks) == 1 else 'have'} waited in"
                 f" {label}" for label, ranks in waiting.items()]
        elsewhere = [r for r in self.running if self._collectives.get(r) is None]
        if elsewhere:
            verb = "is" if len(elsewhere) == 1 else "are"
            lines.append(f"{format_ranks_on(elsewhere, self.hosts)} {verb} not in that collective; every rank's stack:")
        text = "\n".join(lines + ["  " + line for line in self._format_stacks(stacks).splitlines()])
        return StallReport(time=now, text=text, stacks=stacks)


def print_report(report: StallReport, hint: str) -> None:
    """The report on stderr, each line prefixed ``[notebook-fabric]``, then ``hint``."""
    write_notice([*report.text.splitlines(), f"({hint})"], level="warning")


class StallWatchdogSink:
    """An :class:`EventSink` that passes everything on and prints a stall report when one appears
    (``on_report(report)`` is told first: the ``%%fabric`` cell keeps it for ``%fabric where``)."""

    def __init__(self, inner: EventSink, watchdog: StallWatchdog, hint: str,
                 on_report: Optional[Callable[[StallReport], None]] = None) -> None:
        self.inner = inner
        self.watchdog = watchdog
        self.hint = hint
        self._on_report = on_report

    def handle(self, event: RankEvent) -> None:
        if isinstance(event, Heartbeat):
            report = self.watchdog.observe(event)
            if report is not None:
                if self._on_report is not None:
                    self._on_report(report)
                self.inner.flush()
                print_report(report, self.hint)
        self.inner.handle(event)  # heartbeats too: the dashboard shows memory and collectives from them

    def flush(self) -> None:
        self.inner.flush()
