"""What travels when a rank asks for a line: the request (an event, rank -> notebook) and the
answer (a control message, notebook -> rank). Both sides import this module; it imports nothing
heavy, so the notebook can unpickle :class:`StdinUnavailableError` raised in a rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..live.events import RankEvent


@dataclass(frozen=True)
class InputRequest(RankEvent):
    """The rank waits for one line. ``text`` is the debugger's output since its last prompt (shown
    first, whatever ``--show`` says); ``debugger`` is true for pdb's prompt: the rank then keeps the
    notebook's attention until it sends :class:`DebuggerLeft`."""

    request_id: int
    prompt: str
    text: str = ""
    debugger: bool = False


@dataclass(frozen=True)
class DebuggerLeft(RankEvent):
    """The rank left pdb (``continue``, ``quit``, or its task ended); ``text`` is pdb's last output."""

    text: str = ""


@dataclass(frozen=True)
class InputReply:
    """The answer to request ``request_id``: a ``line`` (no newline), or end of input (``eof``), or
    ``abort`` (the notebook was interrupted: leave the prompt with KeyboardInterrupt), or
    ``unavailable`` (why the notebook cannot ask anyone: the rank raises :class:`StdinUnavailableError`)."""

    request_id: int
    line: str = ""
    eof: bool = False
    abort: bool = False
    unavailable: str = ""


class StdinUnavailableError(RuntimeError):
    """A rank asked for input (``breakpoint()``, ``pdb``, ``input()``) but nobody can answer: the
    notebook's frontend has no stdin (nbclient, CI), so the rank fails instead of hanging."""
