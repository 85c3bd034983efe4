"""``launch(fn)``: run ``fn(fabric, *args)`` on every rank and return rank 0's value.

It is a :class:`~.pool.RankPool` started, given one task, and stopped: the same supervision
as the ``%%fabric`` magic. Everything that can be checked is checked before a rank starts
(Fabric arguments, start method, CUDA and fork, picklability under spawn/forkserver).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from ..live.events import Notice
from ..live.dashboard import DashboardSink, want_dashboard
from ..live.sinks import EventSink, TextSink
from ..collectives.ledger_view import remember as remember_ledgers
from ..live.stall import StallWatchdog, StallWatchdogSink
from .pool import RankPool
from .preflight import check_picklable, resolve_start_method
from .start_methods import (
    POOL_START_METHODS, RankSource, check_start_method, inherits_memory, is_pool_start_method, traits_of,
)

_LAUNCHED = "__notebook_fabric_launched__"
START_TIMEOUT = 120.0  # seconds the ranks may take to start when launch() is given no timeout


def launch(fn: Callable[..., Any], *args: Any, devices: Any = 2, accelerator: Any = "auto", strategy: Any = "ddp",
           precision: Any = "32-true", start_method: Optional[str] = None, timeout: Optional[float] = None,
           return_all: bool = False, stall: Optional[float] = 30.0, sink: Optional[EventSink] = None,
           log_dir: Any = None, dashboard: Optional[bool] = None, post_mortem: bool = False,
           cluster: Any = None, **fabric_kwargs: Any) -> Any:
    """Run ``fn(fabric, *args)`` on ``devices`` ranks of this machine; return rank 0's value.

    ``fn`` (and ``args``) may be defined in a notebook cell. Each rank gets
    ``Fabric(accelerator=, strategy=, devices=, precision=, **fabric_kwargs)`` with its process
    group ready. ``start_method``: ``"fork"`` (default where safe: Linux, CUDA not yet
    initialised here), ``"spawn"`` or ``"forkserver"`` (which send ``fn`` and ``args`` with
    cloudpickle). ``timeout``: seconds the ranks may take to start (a :class:`LaunchTimeoutError`
    names those that never connected apart from those that never joined the process group), and
    then seconds the function may run before the launch ends with a :class:`LaunchTimeoutError`
    naming the ranks waiting in a collective and where the others are.
    ``return_all``: return a list of every rank's value. Tensors come back on the CPU.
    ``stall``: when some ranks have waited this many seconds in a collective the others have not
    entered, print who waits where and every rank's stack (once per stall; ``None`` turns it off).
    ``log_dir``: every rank's complete stdout and stderr also go to ``<log_dir>/rank<N>/stdout.log``
    and ``stderr.log`` (path printed at the end); by default to a temporary folder that is removed
    after a successful launch and kept (path printed) after a failure; ``False``: no log files.
    ``dashboard``: in a notebook (default there), a live table of every rank (state, collective,
    memory, progress, output) that freezes into a summary at the end; ``False`` prints text.
    ``post_mortem``: when ``fn`` raises on a rank, open pdb on the failing frame (``(Pdb rank N)``,
    asked here: the kernel's stdin or the terminal) before the ranks are stopped.
    ``breakpoint()``, ``pdb.set_trace()`` and ``input()`` in ``fn`` are asked here the same way.

    ``cluster``: ``"slurm"`` or :class:`~notebook_fabric.Slurm` puts ``devices`` ranks on each of
    ``num_nodes`` hosts that Slurm allocates (see :mod:`notebook_fabric.clusters`).

    Outside the dashboard, rank output is printed live, tagged ``[rank N]``. An exception on any rank stops every
    rank and is re-raised here as its original type (with ``.rank``, ``.ranks`` and
    ``.remote_traceback``); a rank that dies raises :class:`RankDiedError`.
    """
    if not callable(fn):
        raise TypeError(f"launch() needs a function to run on every rank, got {type(fn).__name__}")
    check_start_method(start_method, POOL_START_METHODS, none_allowed=True)
    kwargs = dict(accelerator=accelerator, strategy=strategy, devices=devices, precision=precision, **fabric_kwargs)
    from ..clusters.spec import resolve_cluster

    on_cluster = resolve_cluster(cluster)
    if on_cluster is not None:
        from ..clusters.launch import launch_on_cluster

        return launch_on_cluster(on_cluster, kwargs, fn, args, start_method=start_method, timeout=timeout,
                                 return_all=return_all, stall=stall, sink=sink, log_dir=log_dir, dashboard=dashboard,
                                 post_mortem=post_mortem)
    if _starts_own_ranks(kwargs):  # torch_xla starts XLA ranks itself: no rank pool
        if return_all or timeout is not None or start_method is not None or log_dir is not None:
            raise ValueError("XLA strategies start their ranks with torch_xla: return_all=, timeout=,"
                             " start_method= and log_dir= do not apply")
        from ..fabric import Fabric

        return Fabric(**kwargs).launch(fn, *args)
    num_processes, declared = plan_ranks(kwargs)
    return run_function(kwargs, fn, args, num_processes=num_processes, start_method=start_method or declared,
                        timeout=timeout, return_all=return_all, stall=stall, sink=sink, log_dir=log_dir,
                        dashboard=dashboard, title=f"launch({getattr(fn, '__qualname__', type(fn).__name__)})",
                        post_mortem=post_mortem)


def run_function(fabric_kwargs: Mapping[str, Any], fn: Callable[..., Any], args: Sequence[Any] = (), *,
                 num_processes: int, start_method: Optional[str], timeout: Optional[float] = None,
                 return_all: bool = False, kwargs: Optional[Mapping[str, Any]] = None, stall: Optional[float] = 30.0,
                 sink: Optional[EventSink] = None, log_dir: Any = None, dashboard: Optional[bool] = None,
                 title: str = "launch", post_mortem: bool = False, hosts: Any = None) -> Any:
    """Start ``num_processes`` ranks, each with ``Fabric(**fabric_kwargs)`` launched, run
    ``fn(fabric, *args, **kwargs)`` on all of them, stop them; return rank 0's value (or the list
    by rank with ``return_all``). This is what ``Fabric.launch(fn)`` calls for fork, spawn and
    forkserver strategies. ``dashboard`` as for :func:`launch` (ignored when a ``sink`` is given).
    """
    if not callable(fn):
        raise TypeError(f"expected a function to run on every rank, got {type(fn).__name__}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds (or None), got {timeout!r}")
    if post_mortem:
        from ..stepping.post_mortem import PostMortemOnFailure

        fn = PostMortemOnFailure(fn)
    board = None
    if sink is None and want_dashboard(dashboard):
        board = sink = DashboardSink(range(num_processes), title=title).start()
    sink = sink if sink is not None else TextSink()
    try:
        return _run_function(fabric_kwargs, fn, args, num_processes=num_processes, start_method=start_method,
                             timeout=timeout, return_all=return_all, kwargs=kwargs, stall=stall, sink=sink,
                             log_dir=log_dir, trace_collectives=board is not None, hosts=hosts)
    finally:
        if board is not None:
            board.freeze()


def _run_function(fabric_kwargs: Mapping[str, Any], fn: Callable[..., Any], args: Sequence[Any], *,
                  num_processes: int, start_method: Optional[str], timeout: Optional[float], return_all: bool,
                  kwargs: Optional[Mapping[str, Any]], stall: Optional[float], sink: EventSink, log_dir: Any,
                  trace_collectives: bool, hosts: Any = None) -> Any:
    method = resolve_start_method(start_method, lambda text: sink.handle(Notice(rank=-1, time=time.time(), text=text)))
    args, kwargs = tuple(args), dict(kwargs or {})
    if not inherits_memory(method):  # fork inherits everything; the others pickle it: say what fails, before starting
        check_picklable(_shipped_items(fabric_kwargs, fn, args, kwargs), method)
    pool = RankPool(fabric_kwargs, num_processes, start_method=method, sink=sink,
                    namespace={_LAUNCHED: (fn, args, kwargs)}, log_dir=log_dir, trace_collectives=trace_collectives,
                    hosts=hosts)
    try:
        pool.start(timeout=START_TIMEOUT if timeout is None else timeout)
        watchdog = StallWatchdog(range(num_processes), pool.where, stall)
        run_sink = StallWatchdogSink(sink, watchdog, hint="interrupt to stop the launch; launch(..., stall=None) turns this off")
        results = pool.run(_call_launched_function, timeout=timeout, recover=False, interrupt_grace=1.5, last=True,
                           sink=run_sink)
    finally:
        pool.stop(grace=1.0)
        remember_ledgers(pool.ledgers)
    return [results[rank] for rank in range(num_processes)] if return_all else results[0]


def plan_ranks(fabric_kwargs: Mapping[str, Any]) -> "tuple[int, Optional[str]]":
    """Build the Fabric here (validating every argument, without touching CUDA) and read off
    how many ranks it wants and the start method its strategy declares (if a function one)."""
    from ..fabric import Fabric

    fabric = Fabric(**fabric_kwargs)
    strategy = fabric.strategy
    num_nodes = int(getattr(strategy, "num_nodes", 1) or 1)
    if num_nodes > 1:
        raise ValueError(f"launch() starts ranks on this machine unless told where else, but num_nodes={num_nodes}:"
                         " pass cluster='slurm' (or cluster=Slurm(partition=...)) for ranks on Slurm's hosts, or use"
                         " `notebook-fabric run` on every node")
    num_processes = int(getattr(strategy, "num_processes", 1) or 1)
    declared = getattr(strategy, "start_method", None)
    return num_processes, declared if is_pool_start_method(declared) else None


def _starts_own_ranks(fabric_kwargs: Mapping[str, Any]) -> bool:
    """Whether the strategy's ranks come from torch_xla's launcher rather than a rank pool."""
    strategy = fabric_kwargs.get("strategy")
    if isinstance(strategy, str):
        from ..strategies import STRATEGY_REGISTRY

        strategy = STRATEGY_REGISTRY.get(strategy) if strategy in STRATEGY_REGISTRY else None
    row = traits_of(getattr(strategy, "start_method", None))
    return row is not None and row.source is RankSource.XLA


def _call_launched_function(fabric: Any, namespace: Dict[str, Any]) -> Any:
    fn, args, kwargs = namespace[_LAUNCHED]
    return fn(fabric, *args, **kwargs)


def _shipped_items(fabric_kwargs: Mapping[str, Any], fn: Any, args: tuple, kwargs: dict) -> Dict[str, Any]:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    items: Dict[str, Any] = {f"the function {name}": fn}
    items.update({f"argument {i + 1} of {name} (args[{i}])": value for i, value in enumerate(args)})
    items.update({f"keyword argument {key!r} of {name}": value for key, value in kwargs.items()})
    items.update({f"the Fabric argument {key}=": value for key, value in fabric_kwargs.items()})
    return items
