"""``RankPool``: N supervised rank processes that run tasks until stopped.

The one process-supervision implementation: ``launch(fn)`` is start + one task + stop, and the
``%%fabric`` magic keeps a pool alive across cells. A task is ``task(fabric, namespace)`` where
``namespace`` is the rank's persistent dict (``namespace["fabric"]`` is the rank's Fabric).

    pool = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 2}, num_processes=2,
                    make_fabric=build_rank_fabric).start()   # from notebook_fabric.fabric
    pool.push({"lr": 0.1})
    pool.run(lambda fabric, ns: ns.setdefault("steps", []).append(fabric.global_rank))
    pool.pull("steps")            # {0: [0], 1: [1]}
    pool.where()                  # {0: "File ... in train ...", 1: ...}, even mid-task
    pool.stop()

Failures inside ``run`` are raised in the caller (see :mod:`.run_loop`); an interrupt of the
caller is forwarded to the ranks as KeyboardInterrupt, and ranks that do not stop are ended.
"""
from __future__ import annotations

import atexit
import linecache
import os
import queue
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from ..live.channel import EventListener
from ..live.events import CollectiveState, Notice, RankEvent
from ..live.sinks import EventSink, TextSink
from .errors import PoolClosedError
from .outcome import RunOutcome
from .preflight import resolve_start_method
from .processes import descendants, kill_all, kill_process_group, wait_until
from .protocol import RankBootstrap, RankSetup, StopRank
from .rank_logs import RankLogs
from .rendezvous import RendezvousStore
from ..strategies.start_methods import inherits_memory
from .ranks import Ranks
from .run_loop import RunLoop, pickle_task, wait_until_ready
from .supervisor import RankHandle, Supervisor

if TYPE_CHECKING:  # pragma: no cover
    from .hosts import RankHosts

Task = Callable[[Any, Dict[str, Any]], Any]

_LIVE_POOLS: "weakref.WeakSet[RankPool]" = weakref.WeakSet()


@dataclass(frozen=True)
class RankStatus:
    """One line of ``pool.status()``."""

    rank: int
    pid: int
    state: str
    rss_bytes: Optional[int]
    collective: Optional[CollectiveState]
    seconds_since_heartbeat: Optional[float]


class RankPool:
    """A pool of ``num_processes`` ranks, each with ``Fabric(**fabric_kwargs)`` launched.

    ``start_method``: ``"fork"``, ``"spawn"``, ``"forkserver"`` or ``None`` (fork where safe).
    ``make_fabric(fabric_kwargs)`` builds a rank's prepared Fabric in the rank (required: the pool
    never imports ``fabric.py``; ``notebook_fabric.fabric.build_rank_fabric`` is
    ``Fabric(**kw); fabric.launch()``).
    ``namespace`` seeds every rank's namespace (inherited under fork, cloudpickled otherwise).
    ``sink`` receives every event (default: a :class:`TextSink` printing ``[rank N] ...``).
    ``trace_collectives`` sends every collective enter/exit as an event (heartbeats always carry
    the current collective). ``log_dir``: every rank also appends its complete stdout and stderr
    to ``<log_dir>/rank<N>/stdout.log`` / ``stderr.log``; ``None`` (default) uses a temporary folder,
    removed at :meth:`stop` unless a start or a task failed; ``False``: no log files. A kept folder's
    path is printed when the pool stops (see :mod:`.rank_logs`).
    ``hosts``: where the ranks run (:class:`~.hosts.RankHosts`; default this
    machine, :class:`~.hosts.LocalHosts`); the pool closes it when it stops.
    ``idle_sink`` also gets the heartbeats that arrive between tasks (from the pool's reader thread,
    so it must be thread-safe); during a task they go to the task's sink with the other events.
    """

    def __init__(self, fabric_kwargs: Optional[Mapping[str, Any]] = None, num_processes: int = 2, *,
                 make_fabric: Callable[[Dict[str, Any]], Any], start_method: Optional[str] = None,
                 namespace: Optional[Mapping[str, Any]] = None, sink: Optional[EventSink] = None,
                 heartbeat_interval: float = 2.0, trace_collectives: bool = False,
                 log_dir: Union[str, "os.PathLike[str]", None, bool] = None,
                 idle_sink: Optional[EventSink] = None, hosts: Optional["RankHosts"] = None) -> None:
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
        if not callable(make_fabric):
            raise TypeError("make_fabric must build a rank's Fabric from fabric_kwargs, e.g."
                            f" notebook_fabric.fabric.build_rank_fabric; got {make_fabric!r}")
        if log_dir is True or not (log_dir is None or log_dir is False or isinstance(log_dir, (str, os.PathLike))):
            raise TypeError(f"log_dir must be a path, None (a temporary folder) or False (no logs), got {log_dir!r}")
        if isinstance(log_dir, str) and not log_dir.strip():
            raise ValueError("log_dir='' names no folder: pass a path, None (a temporary folder) or False (no logs)")
        self._log_setting = log_dir
        self._logs: Optional[RankLogs] = None
        self.fabric_kwargs: Dict[str, Any] = dict(fabric_kwargs or {})
        self.num_processes = num_processes
        self.requested_start_method = start_method
        self.start_method: Optional[str] = None
        self.sink: EventSink = sink if sink is not None else TextSink()
        self.heartbeat_interval = heartbeat_interval
        self.trace_collectives = trace_collectives
        self.idle_sink = idle_sink
        if hosts is None:
            from .hosts import LocalHosts

            hosts = LocalHosts()
        self.hosts: "RankHosts" = hosts  # where the ranks run (this machine, or hosts placed by Slurm)
        self._setup = RankSetup(fabric_kwargs=self.fabric_kwargs, make_fabric=make_fabric,
                                namespace=dict(namespace or {}), sys_path=list(sys.path))
        self._handles: List[RankHandle] = []
        self._events: "queue.Queue[RankEvent]" = queue.Queue()
        self._supervisor: Optional[Supervisor] = None
        self._rendezvous: Optional[RendezvousStore] = None
        self._listener: Optional[EventListener] = None
        self._state = "new"  # new | running | stopped
        self._shipped_sources: set = set()
        self._first_task: Optional[tuple] = None  # (task, id, last): sent with the start, collected by run()
        self._lock = threading.RLock()
        # what the run loop, hang detection and stepping see of the ranks
        self._ranks = Ranks(self._handles, self._events, stop=lambda grace: self.stop(grace=grace),
                            keep_logs=self.keep_logs, new_sources=self._new_sources)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Started, not stopped, and every rank still running."""
        return self._state == "running" and all(h.alive for h in self._handles)

    @property
    def world_size(self) -> int:
        return self.num_processes

    @property
    def ledgers(self) -> Dict[int, tuple]:
        """Each rank's newest collective ledger entries (see :mod:`notebook_fabric.collectives.ledger`)."""
        return self._ranks.ledgers

    @property
    def rank_hosts(self) -> Dict[int, str]:
        """rank -> host for ranks on other hosts (a cluster's); empty when every rank runs on this machine."""
        return self._ranks.hosts

    @property
    def pids(self) -> List[int]:
        return [h.pid for h in self._handles]

    @property
    def log_dir(self) -> Optional[str]:
        """The folder of the per-rank log files (``None`` before :meth:`start` or with ``log_dir=False``)."""
        return None if self._logs is None else self._logs.folder

    def keep_logs(self) -> None:
        """Keep the log folder at :meth:`stop` even if it is the temporary default (a run failed)."""
        if self._logs is not None:
            self._logs.keep()

    def start(self, timeout: float = 120.0, first_task: Optional[Task] = None, last: bool = False) -> "RankPool":
        """Start the ranks and return once every one has its Fabric launched (or raise why not).

        ``first_task`` goes to every rank the moment the last one is ready, from the pool's reader
        thread (``launch(fn)`` saves a wake-up of the caller's thread); :meth:`run` of that same
        task object then collects it instead of sending it again (``last``: as ``run(last=True)``)."""
        if self._state != "new":
            raise PoolClosedError("a RankPool starts once; create a new one to start again")
        method = resolve_start_method(self.requested_start_method, self._notify)
        self.start_method = method
        setup_payload = None
        if not inherits_memory(method):
            from notebook_fabric.utilities import by_value, shared_tensors

            self._setup.source_cache = self._new_sources()
            # ranks on this machine map the shared memory of SharedTensors boxes; elsewhere they are copied
            dumps = shared_tensors.dumps if getattr(self.hosts, "shares_memory", False) else by_value.dumps
            setup_payload = dumps(self._setup)
        self._state = "running"
        _LIVE_POOLS.add(self)
        try:
            self._logs = RankLogs(self._log_setting, self.num_processes)
            self._rendezvous = self.hosts.open_rendezvous()
            self._listener = listener = self.hosts.open_channel(max(64, self.num_processes))
            bootstraps = [RankBootstrap(
                rank=rank, world_size=self.num_processes, address=listener.address, authkey=listener.authkey,
                parent_pid=os.getpid(), start_method=method,
                env=self.hosts.rank_environment(self._rendezvous, rank, self.num_processes),
                heartbeat_interval=self.heartbeat_interval, trace_collectives=self.trace_collectives,
                close_ports=(listener.address[1], self._rendezvous.port) if inherits_memory(method) else (),
                listening_fds=_listening_fds(listener, self._rendezvous) if inherits_memory(method) else None,
                log_dir=self._logs.folder,
            ) for rank in range(self.num_processes)]
            for rank, process in enumerate(self.hosts.start_ranks(method, bootstraps, self._setup)):
                self._handles.append(RankHandle(rank, process))
            connected = [p.channel for p in (h.process for h in self._handles) if getattr(p, "channel", None) is not None]
            self._supervisor = Supervisor(self._handles, listener, self._events, setup_payload, connected=connected)
            if self.idle_sink is not None:
                self._supervisor.idle_heartbeats = self.idle_sink.handle
            self._ranks.attach(self._supervisor)
            if first_task is not None:
                task_id = self._ranks.arm_task(range(self.num_processes), pickle_task(first_task), exit_after=last)
                self._first_task = (first_task, task_id, last)
            self._supervisor.start()
            wait_until_ready(self._ranks, self.sink, timeout)
            self._supervisor.stop_accepting()
        except BaseException:
            self.keep_logs()
            self.stop(grace=0.5)
            raise
        return self

    def stop(self, grace: float = 2.0) -> None:
        """End every rank: ask, then SIGTERM, then SIGKILL; also their children. Idempotent.

        A KeyboardInterrupt while waiting skips straight to killing. Events still queued (the
        last output) go to the sink first.
        """
        with self._lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
        try:
            self._end_ranks(grace)
        finally:
            if self._supervisor is not None:
                self._supervisor.stop()
            elif self._listener is not None:
                self._listener.close()
            for handle in self._handles:
                if handle.connection is not None:
                    handle.connection.close()
                handle.process.close()
            if self._rendezvous is not None:
                self._rendezvous.close()
            self.hosts.close()
            _LIVE_POOLS.discard(self)
            self._ranks.drain(self.sink)
            if self.failed_exits():  # a rank crashed on its way out: its logs are kept too
                self.keep_logs()
            kept = self._logs.finish() if self._logs is not None else None
            if kept is not None:
                self._notify(f"per-rank logs (complete stdout and stderr): {kept}")
            self.sink.flush()

    def _end_ranks(self, grace: float) -> None:
        if self._supervisor is not None:
            self._supervisor.finish_when_all_exited()
        living = [h for h in self._handles if h.alive]
        for handle in living:
            handle.exit_expected = True
            handle.send(StopRank())
        trees: List[Any] = []
        try:
            if not self._wait_exits(grace):
                stuck = [h for h in self._handles if h.alive]
                trees = [p for h in stuck for p in descendants(h.pid)]  # before they are re-parented
                for handle in stuck:
                    handle.ended_by_pool = True
                    handle.process.terminate()
                self._wait_exits(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            for handle in self._handles:
                if handle.alive:
                    handle.ended_by_pool = True
                    handle.process.kill()
            self._wait_exits(3.0)
            for handle in self._handles:
                kill_process_group(handle.pid)  # a rank leads its group; its children (workers) stay in it
            kill_all(trees)

    def _wait_exits(self, timeout: float) -> bool:
        if self._supervisor is None or self._supervisor.crash is not None:  # nothing watches the ranks (any more)
            def all_exited() -> bool:
                for handle in self._handles:
                    if handle.alive:
                        handle.exitcode = handle.process.exitcode
                return not any(h.alive for h in self._handles)

            return wait_until(all_exited, timeout)
        deadline = time.monotonic() + timeout
        with self._supervisor.changed:
            while any(h.alive for h in self._handles):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._supervisor.changed.wait(min(remaining, 0.05))
        return True

    def failed_exits(self) -> Dict[int, Any]:
        """``{rank: RankExited}`` of the ranks that ended with a failure by themselves (a crash on
        their way out, after answering): not those the pool had to terminate or kill."""
        return {h.rank: h.exit_event for h in self._handles
                if h.exit_event is not None and h.exit_event.exitcode != 0 and not h.ended_by_pool}

    def __enter__(self) -> "RankPool":
        return self.start() if self._state == "new" else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- tasks ----------------------------------------------------------------------------------
    def run(self, task: Task, ranks: Optional[Iterable[int]] = None, *, timeout: Optional[float] = None,
            sink: Optional[EventSink] = None, recover: bool = True, failure_grace: float = 1.0,
            interrupt_grace: float = 3.0, last: bool = False) -> Dict[int, Any]:
        """Run ``task(fabric, namespace)`` on ``ranks`` (default all); return ``{rank: value}``.

        Events (output first) go to ``sink`` while the task runs. Raises the rank's exception
        (original type, ``.rank``/``.ranks``/``.remote_traceback``), :class:`RankDiedError`,
        :class:`LaunchTimeoutError` after ``timeout`` seconds, or ``KeyboardInterrupt`` when the
        caller was interrupted. With ``recover`` the pool survives failures whenever the other
        ranks can be interrupted; ranks that cannot (stuck in a collective) end the pool.
        ``last``: ranks exit as soon as they answered (``launch`` does this; call :meth:`stop` after).
        """
        return self.run_task(task, ranks, timeout=timeout, sink=sink, recover=recover, failure_grace=failure_grace,
                             interrupt_grace=interrupt_grace, last=last).result()

    def run_task(self, task: Task, ranks: Optional[Iterable[int]] = None, *, timeout: Optional[float] = None,
                 sink: Optional[EventSink] = None, recover: bool = True, failure_grace: float = 1.0,
                 interrupt_grace: float = 3.0, last: bool = False) -> RunOutcome:
        """Like :meth:`run`, but return the :class:`~.outcome.RunOutcome` (values, every rank's
        failure, interrupts, deaths, and the exception ``run`` would raise) instead of raising.
        Only a closed pool or a bad ``ranks`` raises here."""
        self._require_alive()
        selected = self._select(ranks)
        sent_as = None
        if self._first_task is not None:
            first, task_id, first_last = self._first_task
            self._first_task = None
            if first is task:
                if ranks is not None and selected != list(range(self.num_processes)):
                    raise ValueError("the pool's first task went to every rank with its start: run it on all ranks")
                sent_as, last = task_id, first_last
        loop = RunLoop(self._ranks, selected, sink if sink is not None else self.sink, timeout=timeout, recover=recover,
                       failure_grace=failure_grace, interrupt_grace=interrupt_grace, last=last, sent_as=sent_as)
        return loop.outcome(task)

    def push(self, values: Mapping[str, Any], ranks: Optional[Iterable[int]] = None) -> None:
        """Put ``values`` into the namespace of ``ranks`` (default all)."""
        items = dict(values)
        self.run(lambda fabric, namespace: namespace.update(items), ranks)

    def pull(self, name: str, ranks: Optional[Iterable[int]] = None) -> Dict[int, Any]:
        """``{rank: namespace[name]}`` (tensors on CPU); ``KeyError`` if a rank lacks it."""
        return self.run(lambda fabric, namespace: namespace[name], ranks)

    def interrupt(self, ranks: Optional[Iterable[int]] = None) -> List[int]:
        """Send SIGINT (KeyboardInterrupt in the running task) to ``ranks``; returns who got it."""
        return self._ranks.interrupt(self._select(ranks) if ranks is not None else range(len(self._handles)))

    # -- inspection -----------------------------------------------------------------------------
    def where(self, timeout: float = 3.0) -> Dict[int, str]:
        """Every rank's current Python stack (main thread), answered even while a task is stuck."""
        replies = self.where_replies(timeout)
        stacks = {}
        for handle in self._handles:
            reply = replies.get(handle.rank)
            if reply is None:
                stacks[handle.rank] = (f"(no answer within {timeout:.1f} s)" if handle.alive
                                       else f"(rank ended: {handle.state})")
            else:
                prefix = f"in {reply.collective.describe(time.time())}\n" if reply.collective else ""
                stacks[handle.rank] = prefix + reply.stack
        return stacks

    def where_replies(self, timeout: float = 3.0, ledger: bool = False) -> Dict[int, Any]:
        """The raw :class:`~notebook_fabric.live.events.WhereReply` of each rank that answered
        (with the rank's collective ledger when ``ledger``)."""
        return self._ranks.where(timeout, ledger=ledger)

    def status(self) -> Dict[int, RankStatus]:
        """Per rank: pid, state, resident memory (rank and its children), current collective."""
        import psutil

        result = {}
        now = time.time()
        for handle in self._handles:
            rss = None
            if handle.alive:
                try:
                    process = psutil.Process(handle.pid)
                    rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
                except psutil.Error:
                    pass
            beat = handle.heartbeat
            collective = beat.collective if beat is not None and handle.alive else None
            state = handle.state
            if handle.state == "running" and collective is not None:
                state = f"in {collective.describe(now)}"
            result[handle.rank] = RankStatus(rank=handle.rank, pid=handle.pid, state=state, rss_bytes=rss,
                                             collective=collective,
                                             seconds_since_heartbeat=None if beat is None else now - beat.time)
        return result

    @property
    def handles(self) -> List[RankHandle]:
        return self._handles

    def _new_sources(self) -> Dict[str, Any]:
        """``linecache`` entries of notebook cells not yet sent (files that do not exist on disk)."""
        if inherits_memory(self.start_method):
            return {}
        fresh = {}
        for filename, entry in list(linecache.cache.items()):
            if filename in self._shipped_sources or not isinstance(entry, tuple) or len(entry) != 4:
                continue
            if filename.startswith("<") or not os.path.exists(filename):
                fresh[filename] = entry
                self._shipped_sources.add(filename)
        return fresh

    def _notify(self, text: str) -> None:
        self.sink.handle(Notice(rank=-1, time=time.time(), text=text))

    def _select(self, ranks: Optional[Iterable[int]]) -> List[int]:
        if ranks is None:
            return list(range(self.num_processes))
        selected = sorted(set(int(r) for r in ranks))
        bad = [r for r in selected if not 0 <= r < self.num_processes]
        if bad or not selected:
            raise ValueError(f"ranks must be a non-empty subset of 0..{self.num_processes - 1}, got {list(ranks)}")
        return selected

    def _require_alive(self) -> None:
        if self._state != "running":
            raise PoolClosedError(f"the pool is {self._state}; start a new one")
        dead = [h for h in self._handles if not h.alive]
        if dead:
            raise PoolClosedError(f"rank {dead[0].rank} of the pool has ended ({dead[0].state}); stop and start a new pool")

    def __repr__(self) -> str:
        return (f"RankPool(num_processes={self.num_processes}, start_method={self.start_method or self.requested_start_method!r}, "
                f"state={self._state!r})")


def _listening_fds(*listeners: Any) -> Optional[tuple]:
    """The descriptors of the notebook's listening sockets a forked rank inherits (``None`` when one
    of them does not say: the rank then looks at all of its descriptors)."""
    fds = [getattr(listener, "listening_fd", None) for listener in listeners]
    return None if None in fds else tuple(fds)


@atexit.register
def _stop_live_pools() -> None:
    """Interpreter exit: end every pool still running (multiprocessing would wait for them)."""
    for pool in list(_LIVE_POOLS):
        try:
            pool.stop(grace=1.0)
        except Exception:
            pass
