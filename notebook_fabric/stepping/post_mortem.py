"""Inside a rank: pdb on the frame where a task failed, with its locals.

- :class:`PostMortemTask` is the task ``%fabric debug`` sends: it opens pdb on the rank's last
  failure (``sys.last_traceback``, kept by the launcher after every failed task);
- :class:`PostMortemOnFailure` wraps the function of ``launch(fn, ..., post_mortem=True)``: when
  ``fn`` raises, pdb opens on its frame first, then the exception goes on as usual.

Both are small classes of an importable module: they pickle by reference under spawn.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Dict, Optional

from .messages import StdinUnavailableError
from .rank_pdb import user_traceback


def post_mortem(tb: Optional[TracebackType], error: Optional[BaseException] = None) -> None:
    """Open the rank's pdb on ``tb``'s innermost frame (starting below the launcher's frames),
    saying first which exception it is."""
    import pdb

    debugger = pdb.Pdb()  # the rank's RankPdb (see rank_pdb.install)
    debugger.reset()
    if error is not None:
        debugger.message(f"post-mortem of {type(error).__name__}: {error}")
    try:
        debugger.interaction(None, user_traceback(tb))
    except KeyboardInterrupt as interrupt:
        interrupt._nbf_from_post_mortem = True  # type: ignore[attr-defined]  # keep the failure being debugged
        raise


@dataclass(frozen=True)
class PostMortemTask:
    """``task(fabric, namespace)``: pdb on the rank's last failure; returns a note when there is none."""

    def __call__(self, fabric: Any, namespace: Dict[str, Any]) -> Optional[str]:
        tb = getattr(sys, "last_traceback", None)
        if tb is None:
            return f"rank {fabric.global_rank} has no failure to debug"
        post_mortem(tb, getattr(sys, "last_value", None))
        return None


@dataclass(frozen=True)
class PostMortemOnFailure:
    """``fn`` that opens pdb on its own failure before raising it (``launch(..., post_mortem=True)``)."""

    fn: Callable[..., Any]

    def __call__(self, fabric: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.fn(fabric, *args, **kwargs)
        except Exception as error:
            try:
                post_mortem(error.__traceback__, error)
            except StdinUnavailableError as unavailable:  # nobody to ask: the failure itself is the news
                if hasattr(error, "add_note"):
                    error.add_note(f"no post-mortem: {unavailable}")
            raise
