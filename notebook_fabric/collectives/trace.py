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
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Protocol


class Tracer(Protocol):
    def enter(self, op: str, meta: dict) -> Any: ...

    def exit(self, token: Any, error: Optional[BaseException]) -> None: ...


_tracer: Optional[Tracer] = None


def set_tracer(tracer: Optional[Tracer]) -> Optional[Tracer]:
    """Install ``tracer`` for this process (``None`` removes it); returns the previous one."""
    global _tracer
    previous, _tracer = _tracer, tracer
    return previous


def get_tracer() -> Optional[Tracer]:
    return _tracer


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
