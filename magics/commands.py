"""In the notebook: the ``%fabric`` line commands, the guards they share, and the magic's messages.

:class:`PoolCommands` is mixed into :class:`~.session.FabricSession` (which owns ``pool``,
``settings``, ``tracker``, ``user_ns`` ... and ``_start``/``_stop_pool``). ``status`` and
``where`` only read, so they answer from any thread, e.g. a kernel subshell while a cell is
stuck; the others need the main thread and no cell running.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from notebook_fabric.live.ranks import format_ranks
from notebook_fabric.live.notices import write_notice

from .cell_task import CellTask
from .render import format_bytes, format_stacks, format_table
from .settings import PoolSettings

if TYPE_CHECKING:  # pragma: no cover
    from notebook_fabric.launching.pool import RankPool

RESTART_NOTE = "variables from earlier %%fabric cells are gone"


class FabricUsageError(ValueError):
    """A magic was used in a way that cannot work; the message says what to do instead."""


@dataclass(frozen=True)
class Snapshot:
    """Where the ranks were at the last interrupt or stall, for ``%fabric where`` afterwards."""

    what: str
    time: float
    text: str


def notify(text: str, level: str = "info") -> None:
    """A launcher message in the cell: ``[notebook-fabric] text``; on stdout when informational
    (a notebook paints stderr red), on stderr for ``level="warning"``."""
    write_notice(text.splitlines(), level)


def with_render(error: BaseException, lines: List[str]) -> BaseException:
    """Make IPython show ``lines`` instead of a local traceback for ``error`` (its type is kept)."""
    text = [line.rstrip("\n") for line in lines]
    try:
        error._render_traceback_ = lambda: text  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # pragma: no cover - exceptions with __slots__
        pass
    return error


class PoolCommands:
    """``%fabric status | where | ledger | stop | restart | pull | push`` (see the module docstring)."""

    pool: Any
    settings: Optional[PoolSettings]
    user_ns: Any
    tracker: Any
    devices: Any
    cell_running: bool
    ended: Optional[str]
    snapshot: Optional[Snapshot]

    def _start(self, settings: PoolSettings) -> Any:  # pragma: no cover - provided by the session
        raise NotImplementedError

    def _stop_pool(self) -> None:  # pragma: no cover - provided by the session
        raise NotImplementedError

    def status(self) -> str:
        """The pool's settings and, per rank: pid, state, device, memory, last heartbeat."""
        if self.pool is None:
            settings = self.settings or PoolSettings()
            return f"no pool is running; the next %%fabric cell starts one with {settings.describe()}"
        state = "running" if self.pool.alive else "ended"
        busy = " (a cell is running)" if self.cell_running else ""
        rows = []
        for rank, line in sorted(self.pool.status().items()):
            beat = "-" if line.seconds_since_heartbeat is None else f"{line.seconds_since_heartbeat:.1f} s ago"
            rows.append((str(rank), str(line.pid), line.state, self.devices.get(rank, "-"), format_bytes(line.rss_bytes), beat))
        header = f"pool: {self.settings.describe()}, start_method={self.pool.start_method!r}: {state}{busy}"
        return header + "\n" + format_table(("rank", "pid", "state", "device", "memory (RSS)", "heartbeat"), rows)

    def where(self, timeout: float = 3.0) -> str:
        """Every rank's current stack (answered even while a cell is stuck), and the last snapshot."""
        if self.pool is None:
            text = "no pool is running"
        else:
            text = format_stacks(self.pool.where(timeout))
        if self.snapshot is not None and not self.cell_running:
            age = time.time() - self.snapshot.time
            text += f"\n\nAt the last {self.snapshot.what} ({age:.0f} s ago):\n{self.snapshot.text}"
        return text

    def ledger(self, last: Optional[int] = None) -> str:
        """Every rank's collective ledger side by side, aligned by sequence number, the first
        divergence marked (asked of the ranks, so it works while a cell is stuck)."""
        from notebook_fabric.collectives.ledger import with_live_entry
        from notebook_fabric.collectives.ledger_view import LedgerTable

        if self.pool is None:
            return "no pool is running"
        ledgers = dict(self.pool.ledgers)
        if self.pool.alive:
            for rank, reply in self.pool.where_replies(3.0, ledger=True).items():
                if reply.ledger is not None:
                    ledgers[rank] = with_live_entry(reply.ledger, reply.waiting)
        return str(LedgerTable(ledgers, last, hosts=self.pool.rank_hosts))

    def stop(self) -> str:
        self._require_idle("%fabric stop")
        if self.pool is None:
            return "no pool is running"
        count = self.pool.world_size
        self._stop_pool()
        self.ended = None
        return f"stopped the pool ({count} ranks)"

    def restart(self) -> str:
        self._require_idle("%fabric restart")
        settings = self.settings or PoolSettings()
        self._stop_pool()
        self._start(settings)
        return f"restarted the pool: {RESTART_NOTE}"

    def pull(self, name: str, rank: Optional[int] = None, every: bool = False) -> str:
        """``user_ns[name]`` = rank ``rank``'s value (default 0), or the list of every rank's."""
        pool = self._idle_pool("%fabric pull")
        ranks = None if every else [rank or 0]
        try:
            values = pool.pull(name, ranks)
        except KeyError:
            raise FabricUsageError(f"{format_ranks(ranks or range(pool.world_size))} {'has' if ranks else 'have'} no "
                                   f"variable {name!r} (define it in a %%fabric cell first)") from None
        self.user_ns[name] = [values[r] for r in sorted(values)] if every else values[ranks[0]]
        self.tracker.mark_rank_bound([name], self.user_ns)
        source = "every rank (a list indexed by rank)" if every else f"rank {ranks[0]}"
        return f"{name} <- {source}"

    def push(self, names: Sequence[str], ranks: Optional[Sequence[int]] = None) -> str:
        """Send the notebook's ``names`` to the ranks (even if they seem unchanged)."""
        pool = self._idle_pool("%fabric push")
        missing = [n for n in names if n not in self.user_ns]
        if missing:
            raise FabricUsageError(f"the notebook has no variable {', '.join(repr(n) for n in missing)} to push")
        shipment = self.tracker.collect(names, self.user_ns, force=True)
        task = CellTask(filename="<fabric-push>", source="", values=shipment.values, rebind=shipment.rebind,
                        display=False)
        pool.run(task, ranks)
        if ranks is None:
            self.tracker.commit(shipment)
        return f"pushed {', '.join(names)} to {format_ranks(ranks if ranks is not None else range(pool.world_size))}"

    def shutdown(self) -> None:
        """End the pool (extension unloaded, kernel exiting)."""
        self._stop_pool()

    # -- guards ---------------------------------------------------------------------------------
    def _require_main_thread(self, what: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise FabricUsageError(f"{what} must run in the notebook's main shell: ranks die with the thread that "
                                   "starts them. From a subshell, use %fabric where or %fabric status.")

    def _require_idle(self, what: str) -> None:
        self._require_main_thread(what)
        if self.cell_running:
            raise FabricUsageError(f"a %%fabric cell is running; {what} waits for it (interrupt it first). "
                                   "%fabric where and %fabric status work meanwhile.")

    def _idle_pool(self, what: str) -> RankPool:
        self._require_idle(what)
        if self.pool is None or not self.pool.alive:
            raise FabricUsageError(f"{what}: no pool is running; run a %%fabric cell first")
        return self.pool
