"""The tracing seam: one optional tracer per process sees every collective enter and exit.

The launcher installs a tracer in each rank (see ``live/``); with none installed a collective pays
one global lookup. A tracer implements::

    class Tracer(Protocol):
        def enter(self, op: str, meta: dict) -> object: ...      # returns a token
        def exit(self, token: object, error: BaseException | None) -> None: ...

``meta`` carries ``shapes``, ``dtypes``, ``reduce_op``, ``src``, ``group_size`` and ``name`` where they apply.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Protocol


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
