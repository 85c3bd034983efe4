"""Tests wait on state, never on a clock: poll a predicate until it holds, with a deadline."""
from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What a test waited for did not happen within its deadline."""


def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> Optional[T]:
    """The first true value of ``predicate()`` within ``timeout`` seconds, else its last (false) value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05,
               describe: Optional[Callable[[], str]] = None) -> T:  # fmt: skip
    """Poll ``predicate`` until it returns a true value, and return that value.

    Fails with :class:`WaitTimeout` naming ``what`` (and ``describe()``, what was seen instead)
    when ``timeout`` seconds pass first.
    """
    value = poll(predicate, timeout, interval)
    if not value:
        seen = f"; {describe()}" if describe is not None else ""
        raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{seen}")
    return value
