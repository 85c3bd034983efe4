"""Inside a rank: what the dashboard shows besides output, sent on the rank's outbox.

- :class:`MemorySampler`: the one thread that samples host memory (RSS, kept on the rank's state for
  the heartbeats, and its peak) and, through the accelerator's ``memory_stats`` (CUDA's caching
  allocator once the rank initialised CUDA, MPS), the device's figures; it sends them while a task
  runs, plus one sample right before and after every task. It never initialises a device itself.
  It also flushes the metrics reporter, so a rank stuck in a collective has sent what it logged before.
- :func:`report_progress`: tqdm bars (the text bar, which is what ranks draw, see
  :mod:`.isolation`) also send a :class:`Progress` event each time tqdm redraws them.
- :func:`report_metrics`: ``fabric.log`` / ``fabric.log_dict`` also send the scalars as
  :class:`Metrics`, a quarter second's calls at a time (loggers still get them as before).

Everything here puts events on the outbox, which pickles and sends them from its own thread: the
training thread pays for building a small dataclass, at most as often as tqdm redraws or the
user logs.
"""
from __future__ import annotations

import functools
import numbers
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ...live.events import MemorySample, Metrics, Progress

MEMORY_INTERVAL = 0.5  # seconds between samples while a task runs


class MemorySampler:
    """Samples this rank's memory (see the module docstring). ``state.in_task`` gates the thread."""

    def __init__(self, rank: int, outbox: Any, state: Any, interval: float = MEMORY_INTERVAL) -> None:
        import psutil

        self._also: Optional[Callable[[], None]] = None  # run with every sample (the metrics reporter's flush)
        self._device_memory: Optional[Callable[[], Dict[str, int]]] = None
        self.rank = rank
        self.interval = interval
        self._outbox = outbox
        self._state = state
        self._process = psutil.Process()
        self._peak = 0
        self._thread = threading.Thread(target=self._run, name="notebook-fabric memory", daemon=True)

    def start(self) -> "MemorySampler":
        self._read_rss()
        self._thread.start()
        return self

    def watch(self, device_memory: Callable[[], Dict[str, int]], also: Optional[Callable[[], None]] = None) -> None:
        """Once the rank has its Fabric: ``device_memory()`` is its accelerator's ``memory_stats``
        (keys ``allocated``, ``reserved``, ``peak``, ``total``, where known); ``also`` runs with every sample."""
        self._device_memory, self._also = device_memory, also

    def _read_rss(self) -> int:
        try:
            rss = self._process.memory_info().rss
        except Exception:  # noqa: BLE001 - psutil errors: report what we can
            rss = 0
        self._state.rss_bytes = rss
        return rss

    def send(self) -> None:
        """Put one sample on the outbox now."""
        self._outbox.put(self.sample())

    def sample(self) -> MemorySample:
        rss = self._read_rss()
        self._peak = max(self._peak, rss, _peak_rss())
        fields: Dict[str, Any] = {}
        if self._device_memory is not None:
            try:
                stats = self._device_memory()
            except Exception:  # noqa: BLE001 - a broken device must not end the sampler
                stats = {}
            named = {field: stats[key] for key, field in _DEVICE_FIELDS.items() if key in stats}
            if named:
                fields = dict(device=str(stats.get("device", "")) or None, **named)
        return MemorySample(rank=self.rank, time=time.time(), rss_bytes=rss, rss_peak_bytes=self._peak, **fields)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._state.in_task:
                self.send()
                if self._also is not None:
                    self._also()
            else:
                self._read_rss()  # the heartbeats between tasks read it from the state


#: the accelerator's ``memory_stats`` keys -> the fields of :class:`MemorySample`
_DEVICE_FIELDS = {"allocated": "allocated_bytes", "reserved": "reserved_bytes", "peak": "peak_allocated_bytes",
                  "total": "total_bytes"}


def _peak_rss() -> int:
    """The kernel's high-water mark of this process's resident memory (``VmHWM``), or 0."""
    try:
        with open(f"/proc/{os.getpid()}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def report_progress(rank: int, outbox: Any) -> bool:
    """Make every tqdm bar of this rank send :class:`Progress` when drawn and when closed."""
    from tqdm import std  # a dependency: always there

    cls = std.tqdm
    if getattr(cls.display, "_notebook_fabric", False):
        return True
    display, close = cls.display, cls.close

    def send(bar: Any, closed: bool) -> None:
        try:
            info = bar.format_dict
            total, n, elapsed = info.get("total"), float(info.get("n") or 0), float(info.get("elapsed") or 0.0)
            rate = info.get("rate") or (n / elapsed if n and elapsed > 0 else None)  # tqdm's average, as it prints
            outbox.put(Progress(rank=rank, time=time.time(), bar=id(bar), desc=str(info.get("prefix") or ""),
                                n=n, total=None if total is None else float(total), rate=rate,
                                unit=str(info.get("unit") or "it"), elapsed=elapsed, closed=closed))
        except Exception:  # noqa: BLE001 - a report must never break the user's loop
            pass

    @functools.wraps(display)
    def reporting_display(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = display(self, *args, **kwargs)
        send(self, closed=False)
        return result

    @functools.wraps(close)
    def reporting_close(self: Any, *args: Any, **kwargs: Any) -> Any:
        was_open = not self.disable
        result = close(self, *args, **kwargs)
        if was_open:
            send(self, closed=True)
        return result

    reporting_display._notebook_fabric = True  # type: ignore[attr-defined]
    cls.display, cls.close = reporting_display, reporting_close
    return True


class MetricsReporter:
    """Wraps this rank's ``fabric.log_dict`` (``fabric.log`` calls it) to send the scalars too,
    the calls of ``interval`` seconds in one :class:`Metrics` event; :meth:`flush` sends the rest."""

    def __init__(self, rank: int, outbox: Any, interval: float = 0.25) -> None:
        self.rank = rank
        self.interval = interval
        self._outbox = outbox
        self._points: List[Tuple[Optional[int], Dict[str, float]]] = []
        self._sent_at = 0.0
        self._lock = threading.Lock()  # the memory sampler's thread flushes too (a rank waiting in a collective)

    def wrap(self, fabric: Any) -> bool:
        log_dict = getattr(fabric, "log_dict", None)
        if not callable(log_dict):
            return False

        @functools.wraps(log_dict)
        def reporting_log_dict(metrics: Dict[str, Any], step: Optional[int] = None, *args: Any, **kwargs: Any) -> Any:
            scalars = _scalars(metrics)
            if scalars:
                with self._lock:
                    self._points.append((None if step is None else int(step), scalars))
                if time.monotonic() - self._sent_at >= self.interval:
                    self.flush()
            return log_dict(metrics, step, *args, **kwargs)

        fabric.log_dict = reporting_log_dict
        return True

    def flush(self) -> None:
        """Send what was logged since the last event (the rank does this after every task)."""
        with self._lock:
            self._sent_at = time.monotonic()
            points, self._points = tuple(self._points), []
        if points:
            self._outbox.put(Metrics(rank=self.rank, time=time.time(), points=points))


def report_metrics(fabric: Any, rank: int, outbox: Any) -> MetricsReporter:
    """Start reporting what ``fabric`` logs (see :class:`MetricsReporter`)."""
    reporter = MetricsReporter(rank, outbox)
    reporter.wrap(fabric)
    return reporter


def _scalars(metrics: Any) -> Dict[str, float]:
    values: Dict[str, float] = {}
    if not isinstance(metrics, dict):
        return values
    for key, value in metrics.items():
        if hasattr(value, "numel") and hasattr(value, "item"):
            try:
                if value.numel() != 1:
                    continue
                value = value.item()
            except Exception:  # noqa: BLE001
                continue
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[str(key)] = float(value)
    return values
