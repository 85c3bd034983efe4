"""The tracing seam: one optional tracer per process sees every collective enter and exit.

The launcher installs a tracer in each rank (see ``live/``); with none installed a collective pays
one global lookup. A tracer implements::

    class Tracer(Protocol):
        def enter(self, op: str, meta: dict) -> object: ...      # returns a token
        def exit(self, token: object, error: BaseException | None) -> None: ...

``meta`` carries ``shapes``, ``dtypes``, ``reduce_op``, ``src``, ``group`` (the handle),
``group_size`` and ``name`` where they apply; a link may add to it for the links after it.

The chain in a rank, outermost (called first) to innermost; each link wraps the next:

1. ``subset_guard._GuardTracer`` (only while a ``%%fabric --ranks`` cell runs): refuses a
   collective that needs ranks not running the cell, before anything is recorded;
2. ``debug.SignatureChecker`` (debug mode): the ranks compare the call (a socket mesh on one host,
   else a group of its own; world barriers through torch's ``monitored_barrier``),
   and raise the same ``CollectiveMismatchError`` everywhere on a difference;
3. ``ledger.LedgerTracer``: records the call in the rank's ledger and sets ``meta["seq"]``, torch's
   own sequence number of the call's group (the one numbering, shared with the Flight Recorder's
   view of torch's internal collectives);
4. ``launching.rank.control.CollectiveTracer`` (only where the notebook asked for enter/exit
   events: the dashboard): sends them, numbered by ``meta["seq"]``. Heartbeats, stall reports and
   ``where`` read the rank's current collective from the ledger's open call, so without events a
   collective is recorded once.

A refused or mismatched call never reaches the ledger: it was not issued.

Ranks that are threads of one process (torch_xla on its CPU device) each need a chain of their
own: :func:`tracers_per_thread` (called once in that process, before the rank threads trace) makes
``set_tracer``/``get_tracer`` and :func:`rank_state` per thread, and routes the process's calls to
the calling thread's chain. Processes whose ranks are processes never pay for it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Protocol


class Tracer(Protocol):
    def enter(self, op: str, meta: dict) -> Any: ...

    def exit(self, token: Any, error: Optional[BaseException]) -> None: ...


_tracer: Optional[Tracer] = None
_per_thread: Optional[threading.local] = None  # set by tracers_per_thread(): ranks are threads
_process_state: dict = {}


def set_tracer(tracer: Optional[Tracer]) -> Optional[Tracer]:
    """Install ``tracer`` for this process, or this rank thread (``None`` removes it); returns the previous one."""
    global _tracer
    if _per_thread is not None:
        previous = getattr(_per_thread, "tracer", None)
        _per_thread.tracer = tracer
        return previous
    previous, _tracer = _tracer, tracer
    return previous


def get_tracer() -> Optional[Tracer]:
    return getattr(_per_thread, "tracer", None) if _per_thread is not None else _tracer


def rank_state() -> dict:
    """Values a rank keeps beside its tracer (e.g. debug mode's check channel): per thread where
    ranks are threads, else one dict for the process."""
    if _per_thread is None:
        return _process_state
    if not hasattr(_per_thread, "state"):
        _per_thread.state = {}
    return _per_thread.state


def tracers_per_thread() -> None:
    """From now on each thread of this process is a rank with its own tracer chain (idempotent)."""
    global _per_thread, _tracer
    if _per_thread is None:
        _per_thread = threading.local()
        _tracer = _ThreadRouter()


class _ThreadRouter:
    """The process's tracer while ranks are threads: hands each call to the calling thread's chain."""

    def enter(self, op: str, meta: dict) -> Any:
        tracer = getattr(_per_thread, "tracer", None)
        return (tracer, tracer.enter(op, meta) if tracer is not None else None)

    def exit(self, token: Any, error: Optional[BaseException]) -> None:
        tracer, inner = token
        if tracer is not None:
            tracer.exit(inner, error)


@contextmanager
def traced(tracer: Tracer, op: str, meta: dict) -> Iterator[None]:
    token = tracer.enter(op, meta)
    try:
        yield
    except BaseException as error:
        tracer.exit(token, error)
        raise
    tracer.exit(token, None)


def run_traced(op: str, call: Callable[[], Any], meta: Callable[[], dict]) -> Any:
    """``call()``, between the tracer's enter and exit when one is installed (``meta`` is built only then)."""
    tracer = _tracer
    if tracer is None:
        return call()
    token = tracer.enter(op, meta())  # what ``traced`` does, without a generator per call
    try:
        result = call()
    except BaseException as error:
        tracer.exit(token, error)
        raise
    tracer.exit(token, None)
    return result
