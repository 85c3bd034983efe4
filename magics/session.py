"""In the notebook: the magic's state (one pool, its settings, what the ranks hold) and ``%%fabric``.

:class:`FabricSession` owns at most one :class:`~notebook_fabric.launching.pool.RankPool`. It starts
the pool on the first cell, reuses it while the settings match, restarts it (and says why) when
they change or the pool ended, ships the notebook values a cell reads, runs the cell, and turns
every outcome into a value to display or an exception that renders per rank. It takes the
notebook namespace as a plain dict and never imports IPython (:mod:`.ipython_magics` does that).

Ranks are tied to the thread that starts them (they die with it), so pools start and cells run
only on the main thread; ``status`` and ``where`` answer from any thread, e.g. a kernel subshell
while a cell is stuck.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from notebook_fabric.fabric import Fabric, build_rank_fabric
from notebook_fabric.launching.errors import LaunchTimeoutError, RankDiedError
from notebook_fabric.live.ranks import format_ranks
from notebook_fabric.strategies.start_methods import is_pool_start_method
from notebook_fabric.launching.pool import RankPool
from notebook_fabric.launching.processes import describe_exit
from notebook_fabric.live.dashboard import DashboardSink, want_dashboard
from notebook_fabric.live.sinks import NullSink, TextSink

from .analysis import analyze_cell
from .cell_sink import CellSink
from .cell_task import CellTask
from .commands import RESTART_NOTE, FabricUsageError, PoolCommands, Snapshot, notify, with_render
from .debugging import DebugCommands
from .probe import probe_rank
from .render import RankValues, format_failures, format_stacks
from notebook_fabric.launching.outcome import RunOutcome
from .settings import PoolSettings, parse_ranks
from .shipping import UnpicklableVariableError, ValueTracker

FAILURE_GRACE = 1.0  # seconds to collect the other ranks' failures after the first
INTERRUPT_GRACE = 3.0  # seconds ranks get to stop after an interrupt before the pool is ended


@dataclass
class CellOptions:
    """The per-cell options of ``%%fabric`` (pool settings are in ``settings``, ``None`` = keep)."""

    settings: Dict[str, Any] = field(default_factory=dict)
    ranks: Optional[str] = None
    timeout: Optional[float] = None
    stall: Optional[float] = 10.0
    show: Optional[str] = None
    outs: Sequence[str] = ()
    out_all: Sequence[str] = ()
    dashboard: Optional[bool] = None  # None: the live dashboard in a notebook, text elsewhere


class FabricSession(PoolCommands, DebugCommands):
    """One notebook's pool and everything the magics do with it (see the module docstring).

    The ``%fabric`` line commands (status, where, stop, restart, pull, push) come from
    :class:`~.commands.PoolCommands`; ``%fabric debug`` from :class:`~.debugging.DebugCommands`.
    """

    def __init__(self, user_ns: Dict[str, Any], heartbeat_interval: float = 1.0) -> None:
        self.user_ns = user_ns
        self.heartbeat_interval = heartbeat_interval
        self.pool: Optional[RankPool] = None
        self.settings: Optional[PoolSettings] = None
        self.tracker = ValueTracker()
        self.devices: Dict[int, str] = {}
        self.cell_running = False
        self.ended: Optional[str] = None
        self.snapshot: Optional[Snapshot] = None
        self._names: Dict[int, int] = {}

    # -- the pool -------------------------------------------------------------------------------
    def ensure_pool(self, requested: Dict[str, Any]) -> RankPool:
        """The running pool if it matches ``requested``; otherwise a new one (saying why)."""
        try:
            wanted = (self.settings or PoolSettings()).merged(requested)
        except ValueError as error:
            raise FabricUsageError(str(error)) from None
        if self.pool is None and self.ended:
            notify(f"the previous pool ended ({self.ended}); starting a new one: {RESTART_NOTE}", "warning")
        if self.pool is not None:
            if self.pool.alive and wanted == self.settings:
                return self.pool
            if not self.pool.alive:
                notify(f"the previous pool ended ({self._why_ended()}); starting a new one: {RESTART_NOTE}", "warning")
            else:
                notify(f"settings changed ({', '.join(wanted.changes_from(self.settings))}); "
                       f"restarting the pool: {RESTART_NOTE}", "warning")
            self._stop_pool()
        return self._start(wanted)

    def _start(self, settings: PoolSettings) -> RankPool:
        self._require_main_thread("starting ranks")
        started = time.monotonic()
        hosts = None
        try:  # build the Fabric here first: bad settings fail at once, before any process starts
            if settings.cluster is not None:  # hosts from a cluster (Slurm): checked and allocated here
                from notebook_fabric.clusters.magic_pool import cluster_hosts

                num_processes, declared, hosts = cluster_hosts(settings, lambda text: notify(text))
            else:
                num_processes, declared = plan_ranks(settings.fabric_kwargs())
        except (ValueError, TypeError, RuntimeError) as error:
            raise with_render(error, [f"{type(error).__name__}: cannot start {settings.describe()}: {error}",
                                      "Nothing was started; fix the option and run the cell again."]) from None
        pool = RankPool(settings.fabric_kwargs(), num_processes=num_processes, make_fabric=build_rank_fabric,
                        start_method=settings.start_method or declared, sink=TextSink(),
                        heartbeat_interval=self.heartbeat_interval, log_dir=settings.log_dir,
                        trace_collectives=True, hosts=hosts)
        try:
            pool.start()
        except BaseException as error:
            self.pool = None
            raise with_render(error, [f"{type(error).__name__}: could not start {settings.describe()}:",
                                      *str(error).splitlines(), *_notes(error),
                                      *_remote_traceback(error)]) from None
        self.pool, self.settings, self.ended, self.snapshot = pool, settings, None, None
        self.tracker.reset()
        info = pool.run(probe_rank, sink=NullSink())
        self.devices = {rank: str(value["device"]) for rank, value in info.items()}
        notify(f"started {settings.describe()}, start_method={pool.start_method!r} "
               f"in {time.monotonic() - started:.1f} s; per-rank logs in {pool.log_dir}")
        return pool

    def _stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        self.pool = None
        self.tracker.reset()

    def _why_ended(self) -> str:
        if self.ended:
            return self.ended
        dead = [h for h in self.pool.handles if not h.alive] if self.pool is not None else []
        if dead:
            return "; ".join(f"rank {h.rank} {describe_exit(h.exitcode)}" for h in dead)
        return "it was stopped"

    # -- %%fabric -------------------------------------------------------------------------------
    def run_cell(self, source: str, options: CellOptions, number: Optional[int] = None,
                 header: Optional[str] = None) -> Optional[RankValues]:
        """Run ``source`` on the pool's ranks; the per-rank values to display (``None``: nothing).

        ``header`` is the cell's ``%%fabric ...`` line: given, line numbers count it, as the notebook does.
        """
        self._require_main_thread("%%fabric cells")
        filename = self._filename(number)
        analysis = analyze_cell(source, filename, 0 if header is None else 1)
        pool = self.ensure_pool(options.settings)
        try:
            running = parse_ranks(options.ranks, pool.world_size)
            show = self._show(options.show, running, pool.world_size)
        except ValueError as error:
            raise FabricUsageError(str(error)) from None
        ranks = running if running is not None else list(range(pool.world_size))
        try:
            shipment = self.tracker.collect(analysis.reads, self.user_ns)
        except UnpicklableVariableError as error:
            raise with_render(error, [f"{type(error).__name__}: {error}"]) from None
        task = CellTask(filename=filename, source=source, values=shipment.values, rebind=shipment.rebind,
                        outs=tuple(dict.fromkeys([*options.outs, *options.out_all])), display=analysis.display,
                        running=None if running is None else tuple(running), header=header)
        board = None
        if want_dashboard(options.dashboard):
            board = DashboardSink(ranks, title="%%fabric", shown=show if show is not None else ranks).start()
        sink = CellSink(show, ranks, where=lambda timeout: pool.where(timeout), stall_after=options.stall,
                        dashboard=board, hosts=pool.rank_hosts)
        record = RunOutcome(ranks=ranks)
        self.cell_running = True
        try:  # the whole outcome, not only the first group of failures: every rank's traceback is shown
            record = pool.run_task(task, running, timeout=options.timeout, sink=sink, recover=True,
                                   failure_grace=FAILURE_GRACE, interrupt_grace=INTERRUPT_GRACE)
            results = record.result()
        except KeyboardInterrupt as error:
            self.tracker.forget(shipment.values)
            raise self._interrupted(error, record, ranks, sink.notices) from None
        except Exception as error:
            self.tracker.forget(shipment.values)
            self.remember_failed_ranks([r for r in record.arrival
                                        if record.failures[r].type_name != "KeyboardInterrupt"])
            raise self._failed(error, record, ranks) from None
        finally:
            self.cell_running = False
            if board is not None:
                board.freeze()
            if sink.stall_report is not None:
                self.snapshot = Snapshot("stall", sink.stall_report.time, sink.stall_report.text)
        self.tracker.commit(shipment)
        self.tracker.mark_rank_bound(analysis.binds, self.user_ns)
        self._deliver_outs(results, options)
        values = {rank: outcome.value for rank, outcome in results.items() if outcome.value is not None}
        return RankValues(values) if values else None

    def _deliver_outs(self, results: Dict[int, Any], options: CellOptions) -> None:
        import pickle

        first = min(results)
        for name in options.outs:
            self.user_ns[name] = pickle.loads(results[first].outs[name])
        for name in options.out_all:
            self.user_ns[name] = [pickle.loads(results[rank].outs[name]) for rank in sorted(results)]
        self.tracker.mark_rank_bound([*options.outs, *options.out_all], self.user_ns)

    def _filename(self, number: Optional[int]) -> str:
        """``<fabric-cell-N>`` after the notebook's ``In [N]``; ``<fabric-cell-N.2>`` if N ran twice."""
        key = number if number is not None else -1
        count = self._names.get(key, 0) + 1
        self._names[key] = count
        label = str(number) if number is not None else f"x{count}"
        return f"<fabric-cell-{label}>" if count == 1 or number is None else f"<fabric-cell-{label}.{count}>"

    @staticmethod
    def _show(text: Optional[str], running: Optional[List[int]], world_size: int) -> Optional[List[int]]:
        if text is None:
            return running if running is not None else [0]
        if text.strip().lower() == "all":
            return None
        chosen = parse_ranks(text, world_size)
        return chosen  # None when the list names every rank

    # -- outcomes -------------------------------------------------------------------------------
    def _pool_state_line(self) -> str:
        if self.pool is not None and self.pool.alive:
            return "The pool is still running; variables from earlier cells are kept."
        self.ended = self.ended or "stopped after the failure above"
        return f"The pool was stopped; the next %%fabric cell starts a new one ({RESTART_NOTE})."

    def _failed(self, error: Exception, record: RunOutcome, ranks: List[int]) -> BaseException:
        lines: List[str] = []
        dead = {} if isinstance(error, RankDiedError) else dict(record.deaths)
        if dead:  # another rank's error (e.g. a collective's peer hung up) arrived before the death itself
            self.ended = record.death_summary
            lines.append(f"RankDiedError: {self.ended} while running the cell; the other ranks' errors follow from it:")
            first = min(dead)
            cause = error
            error = RankDiedError(f"{self.ended} while running the cell", rank=first, ranks=sorted(dead),
                                  exitcode=self.pool.handles[first].process.exitcode if self.pool else None)
            error.__context__ = cause
            self._stop_pool()
        if dead:
            lines += format_failures(record.failures, record.arrival, ranks, skip_interrupts=True)
        elif isinstance(error, RankDiedError):
            self.ended = str(error)
            lines.append(f"{type(error).__name__}: {error}")
            lines += _notes(error)
            lines += format_failures(record.failures, record.arrival, ranks, skip_interrupts=True)
        elif isinstance(error, LaunchTimeoutError):
            lines.append(f"{type(error).__name__}: {error}")
            lines += [f"  {line}" for line in format_stacks(error.stacks).splitlines()] if error.stacks else []
        elif record.failures:
            groups = format_failures(record.failures, record.arrival, ranks, skip_interrupts=True)
            lines.append(f"{type(error).__name__} on {format_ranks(getattr(error, 'ranks', None) or sorted(record.failures))} "
                         "while running the cell:")
            lines += groups
        else:
            lines.append(f"{type(error).__name__}: {error}")
            lines += _notes(error)
        lines.append(self._pool_state_line())
        return with_render(error, lines)

    def _interrupted(self, error: KeyboardInterrupt, record: RunOutcome, ranks: List[int],
                     notices: List[str]) -> BaseException:
        stopped = sorted(record.interrupted)
        lines = ["KeyboardInterrupt: the %%fabric cell was interrupted."]
        if stopped:
            lines.append(f"{format_ranks(stopped)} stopped with KeyboardInterrupt (where: the lines above; "
                         "%fabric where shows them again).")
        if notices:
            self.snapshot = Snapshot("interrupt", time.time(), "\n".join(notices))
        failed = {r: f for r, f in record.failures.items() if f.type_name != "KeyboardInterrupt"}
        if failed:
            lines += format_failures(failed, [r for r in record.arrival if r in failed], sorted(failed))
        if self.pool is not None and not self.pool.alive:
            stuck = record.unfinished
            if stuck:
                lines.append(f"{format_ranks(stuck)} did not stop within {INTERRUPT_GRACE:g} s (or the kernel was "
                             "interrupted twice) and {} terminated.".format("was" if len(stuck) == 1 else "were"))
            self.ended = "it was stopped after an interrupt"
        lines.append(self._pool_state_line())
        return with_render(error, lines)


def _notes(error: BaseException) -> List[str]:
    return [str(n) for n in getattr(error, "__notes__", []) or []]


def _remote_traceback(error: BaseException) -> List[str]:
    text = getattr(error, "remote_traceback", None)
    return ["Traceback on the rank:", *text.rstrip().splitlines()] if text else []


def plan_ranks(fabric_kwargs: Dict[str, Any]) -> "tuple[int, Optional[str]]":
    """Build the pool's Fabric here (validating every setting, without touching CUDA) and read off how
    many ranks it wants and the start method its strategy declares (if a pool one)."""
    strategy = Fabric(**fabric_kwargs).strategy
    num_nodes = int(getattr(strategy, "num_nodes", 1) or 1)
    if num_nodes > 1:
        raise ValueError(f"the %%fabric pool starts ranks on this machine only, but num_nodes={num_nodes}")
    declared = getattr(strategy, "start_method", None)
    return int(getattr(strategy, "num_processes", 1) or 1), declared if is_pool_start_method(declared) else None
