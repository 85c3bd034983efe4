"""Running one function on a fresh pool of ranks: what ``PoolLauncher`` (behind ``launch(fn)`` and
``fabric.launch(fn)``) does.

It is a :class:`~.pool.RankPool` started, given one task, and stopped: the same supervision
as the ``%%fabric`` magic. Everything that can be checked is checked before a rank starts
(start method, CUDA and fork, picklability under spawn/forkserver). Under spawn and forkserver the
arguments' CPU tensors reach ranks on this machine in shared memory, the parameters and buffers of
modules among them as copies (:mod:`notebook_fabric.utilities.shared_tensors`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from ..live.events import Notice
from ..live.dashboard import DashboardSink, want_dashboard
from ..live.sinks import EventSink, TextSink
from ..collectives.ledger_view import remember as remember_ledgers
from ..live.stall import StallWatchdog, StallWatchdogSink
from ..strategies.start_methods import inherits_memory
from ..utilities.shared_tensors import SharedTensors
from .options import LaunchOptions
from .pool import RankPool
from .preflight import check_picklable, resolve_start_method
from .run_loop import exit_error

_LAUNCHED = "__notebook_fabric_launched__"
START_TIMEOUT = 120.0  # seconds the ranks may take to start when launch() is given no timeout


def run_function(fabric_kwargs: Mapping[str, Any], fn: Callable[..., Any], args: Sequence[Any] = (),
                 kwargs: Optional[Mapping[str, Any]] = None, *, make_fabric: Callable[[Mapping[str, Any]], Any],
                 num_processes: int, start_method: Optional[str] = None,
                 options: LaunchOptions = LaunchOptions(), hosts: Any = None) -> Any:
    """Start ``num_processes`` ranks, each with ``make_fabric(fabric_kwargs)`` (its prepared Fabric), run
    ``fn(fabric, *args, **kwargs)`` on all of them, stop them; return rank 0's value (or the list
    by rank with ``options.return_all``). ``start_method``: the strategy's (``options.start_method``
    wins; ``None``: fork where safe). The other options as for :func:`notebook_fabric.launch`
    (``dashboard`` is ignored when a ``sink`` is given).
    """
    if not callable(fn):
        raise TypeError(f"expected a function to run on every rank, got {type(fn).__name__}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if options.post_mortem:
        from ..stepping.post_mortem import PostMortemOnFailure

        fn = PostMortemOnFailure(fn)
    sink, board = options.sink, None
    if sink is None and want_dashboard(options.dashboard):
        board = sink = DashboardSink(range(num_processes), title=options.title).start()
    sink = sink if sink is not None else TextSink()
    try:
        return _run_function(fabric_kwargs, fn, tuple(args), dict(kwargs or {}), make_fabric=make_fabric,
                             num_processes=num_processes, start_method=options.start_method or start_method,
                             options=options, sink=sink, trace_collectives=board is not None, hosts=hosts)
    finally:
        if board is not None:
            board.freeze()


def _run_function(fabric_kwargs: Mapping[str, Any], fn: Callable[..., Any], args: tuple, kwargs: dict, *,
                  make_fabric: Callable[[Mapping[str, Any]], Any], num_processes: int, start_method: Optional[str],
                  options: LaunchOptions, sink: EventSink, trace_collectives: bool, hosts: Any = None) -> Any:
    method = resolve_start_method(start_method, lambda text: sink.handle(Notice(rank=-1, time=time.time(), text=text)))
    if not inherits_memory(method):  # fork inherits everything; the others pickle it: say what fails, before starting
        check_picklable(_shipped_items(fabric_kwargs, fn, args, kwargs), method)
    pool = RankPool(fabric_kwargs, num_processes, make_fabric=make_fabric, start_method=method, sink=sink,
                    namespace={_LAUNCHED: (fn, SharedTensors((args, kwargs)))}, log_dir=options.log_dir,
                    trace_collectives=trace_collectives, hosts=hosts)
    timeout = options.timeout
    try:
        # the function goes to every rank from the pool's reader thread the moment the last one is ready
        pool.start(timeout=START_TIMEOUT if timeout is None else timeout, first_task=_call_launched_function, last=True)
        watchdog = StallWatchdog(range(num_processes), pool.where, options.stall, hosts=pool.rank_hosts)
        run_sink = StallWatchdogSink(sink, watchdog, hint="interrupt to stop the launch; launch(..., stall=None) turns this off")
        results = pool.run(_call_launched_function, timeout=timeout, recover=False, interrupt_grace=1.5, last=True,
                           sink=run_sink)
    finally:
        pool.stop(grace=1.0)
        remember_ledgers(pool.ledgers, pool.rank_hosts)
    crashed = pool.failed_exits()  # every rank answered, and the call waited for their exits: say if one crashed
    if crashed:
        raise exit_error(crashed)
    return [results[rank] for rank in range(num_processes)] if options.return_all else results[0]


def _call_launched_function(fabric: Any, namespace: Dict[str, Any]) -> Any:
    fn, arguments = namespace[_LAUNCHED]
    args, kwargs = arguments.value
    return fn(fabric, *args, **kwargs)


def _shipped_items(fabric_kwargs: Mapping[str, Any], fn: Any, args: tuple, kwargs: dict) -> Dict[str, Any]:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    items: Dict[str, Any] = {f"the function {name}": fn}
    items.update({f"argument {i + 1} of {name} (args[{i}])": value for i, value in enumerate(args)})
    items.update({f"keyword argument {key!r} of {name}": value for key, value in kwargs.items()})
    items.update({f"the Fabric argument {key}=": value for key, value in fabric_kwargs.items()})
    return items
