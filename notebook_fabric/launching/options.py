"""How one launch runs, apart from what it runs: :class:`LaunchOptions`.

``launch(fn, ...)`` and ``fabric.launch(fn, ...)`` take the same keywords and build one of these;
it travels unchanged to the launcher, which reads what applies to it. Every value is checked
here, so bad input fails before a rank starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from ..live.sinks import EventSink
from ..strategies.start_methods import POOL_START_METHODS, check_start_method


@dataclass(frozen=True)
class LaunchOptions:
    """``start_method``: ``"fork"``, ``"spawn"``, ``"forkserver"`` or ``None`` (the strategy's, else
    fork where safe). ``timeout``: seconds the ranks may take to start, then seconds the function may
    run. ``return_all``: every rank's value, by rank. ``stall``: seconds in a collective others have not
    entered before the stall report (``None``: off). ``sink``: receives every event (replaces the text
    output and the dashboard). ``log_dir``: a folder for the per-rank logs, ``None`` (a temporary one,
    kept after a failure) or ``False``. ``dashboard``: the live table in a notebook (``None``: there
    by default). ``post_mortem``: pdb on the failing frame of a rank. ``title``: the dashboard's."""

    start_method: Optional[str] = None
    timeout: Optional[float] = None
    return_all: bool = False
    stall: Optional[float] = 30.0
    sink: Optional[EventSink] = None
    log_dir: Any = None
    dashboard: Optional[bool] = None
    post_mortem: bool = False
    title: str = "launch"

    def __post_init__(self) -> None:
        check_start_method(self.start_method, POOL_START_METHODS, none_allowed=True)
        timeout = self.timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (or None), got {timeout!r}")
        log_dir = self.log_dir
        if log_dir is True or not (log_dir is None or log_dir is False or isinstance(log_dir, (str, os.PathLike))):
            raise TypeError(f"log_dir must be a path, None (a temporary folder) or False (no logs), got {log_dir!r}")
        if isinstance(log_dir, str) and not log_dir.strip():
            raise ValueError("log_dir='' names no folder: pass a path, None (a temporary folder) or False (no logs)")

    def changed(self) -> Dict[str, Any]:
        """The options given a value other than their default (``title`` aside)."""
        default = LaunchOptions()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "title" and getattr(self, f.name) is not getattr(default, f.name)
                and getattr(self, f.name) != getattr(default, f.name)}
