"""Where events go in the notebook: the ``EventSink`` seam and the plain-text printer.

The launcher calls ``sink.handle(event)`` for every event, from the thread that waits for the
run (the notebook's main thread, so printed text lands in the running cell), and
``sink.flush()`` when a run ends. A dashboard implements the same two methods.

Output convention (the same everywhere): every line a rank writes is printed with a
``[rank N] `` prefix, rank 0 included, stdout lines to ``sys.stdout`` and stderr lines to
``sys.stderr`` as they are at print time (in a kernel: the cell). Launcher messages are prefixed
``[notebook-fabric] `` and go to ``sys.stderr``, except informational ones in a kernel, which go to
``sys.stdout`` (see :mod:`.notices`).
"""
from __future__ import annotations

import sys
import threading
from typing import Dict, Iterable, List, Optional, Protocol, Set, Tuple, runtime_checkable

from .events import Notice, Output, RankEvent
from .notices import write_notice


@runtime_checkable
class EventSink(Protocol):
    """Receives the events of a run. Must be cheap: it runs between the launcher's checks."""

    def handle(self, event: RankEvent) -> None: ...

    def flush(self) -> None: ...


class NullSink:
    """Drops everything."""

    def handle(self, event: RankEvent) -> None:
        pass

    def flush(self) -> None:
        pass


class TextSink:
    """Prints rank output as ``[rank N] line`` and launcher notices as ``[notebook-fabric] text``.

    ``ranks`` limits the output shown to those ranks (``None``: all). Partial lines are held until
    their newline arrives or ``flush()`` is called, so lines of different ranks never mix.
    """

    def __init__(self, ranks: Optional[Iterable[int]] = None, show_notices: bool = True) -> None:
        self.ranks: Optional[Set[int]] = None if ranks is None else set(ranks)
        self.show_notices = show_notices
        self._partial: Dict[Tuple[int, str], str] = {}

    def handle(self, event: RankEvent) -> None:
        if isinstance(event, Output):
            if self.ranks is None or event.rank in self.ranks:
                self._write_output(event)
        elif isinstance(event, Notice) and self.show_notices:
            write_notice([event.text, *event.details], event.level)

    def flush(self) -> None:
        for (rank, stream), text in sorted(self._partial.items()):
            if text:
                _stream(stream).write(f"[rank {rank}] {text}\n")
        self._partial.clear()
        for name in ("stdout", "stderr"):
            try:
                _stream(name).flush()
            except (AttributeError, ValueError, OSError):
                pass

    def _write_output(self, event: Output) -> None:
        key = (event.rank, event.stream)
        text = self._partial.pop(key, "") + event.text
        *complete, rest = text.split("\n")
        if rest:
            self._partial[key] = rest
        if complete:
            _stream(event.stream).write("".join(f"[rank {event.rank}] {line}\n" for line in complete))


class RecordingSink:
    """Keeps every event (thread-safe); for tests and for code that inspects a run afterwards."""

    def __init__(self, forward: Optional[EventSink] = None) -> None:
        self.events: List[RankEvent] = []
        self._forward = forward
        self._lock = threading.Lock()

    def handle(self, event: RankEvent) -> None:
        with self._lock:
            self.events.append(event)
        if self._forward is not None:
            self._forward.handle(event)

    def flush(self) -> None:
        if self._forward is not None:
            self._forward.flush()

    def output(self, rank: int, stream: str = "stdout") -> str:
        """Everything ``rank`` wrote to ``stream``, concatenated in order."""
        with self._lock:
            return "".join(e.text for e in self.events if isinstance(e, Output) and e.rank == rank and e.stream == stream)


class FanOutSink:
    """Hands every event to several sinks (e.g. the dashboard and a recorder)."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def handle(self, event: RankEvent) -> None:
        for sink in self.sinks:
            sink.handle(event)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()


def _stream(name: str):
    """The current ``sys.stdout``/``sys.stderr`` (looked up late: kernels swap them per cell)."""
    stream = getattr(sys, name, None)
    if stream is None:  # pythonw and friends
        stream = sys.__stdout__ if name == "stdout" else sys.__stderr__
    return stream
