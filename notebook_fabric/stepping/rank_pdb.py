"""Inside a rank: the pdb that ``breakpoint()``, ``pdb.set_trace()`` and ``pdb.post_mortem()`` get.

:class:`RankPdb` is pdb with four changes:

- its terminal is a :class:`~.rank_prompts.DebuggerTerminal` (the notebook asks, the dialogue comes
  back whole), and its prompt names the rank: ``(Pdb rank 1)``;
- it never installs its own SIGINT handler (``nosigint``): an interrupt from the notebook must stay
  a KeyboardInterrupt in the rank, not a new stop in the debugger;
- it does not stop in notebook-fabric's own frames, nor in code they call after the user's code
  returned (stepping off the end of a cell ends in the next task-free place: nowhere), and its
  stack (``where``, ``up``) starts at the user's code, not at the launcher (or, in a forked rank,
  the kernel it was forked from);
- leaving it (``continue``, ``quit``, the end of a post-mortem) tells the notebook, which then
  serves the next rank; an interrupt from the notebook leaves it with KeyboardInterrupt.
"""
from __future__ import annotations

import os
import pdb
import sys
from types import FrameType, TracebackType
from typing import Any, Iterable, List, Optional, Tuple

from .messages import StdinUnavailableError
from .rank_prompts import DebuggerTerminal, PromptAborted, prompter

PACKAGE = "notebook_fabric"
#: notebook-fabric functions that call the user's code: frames below them are the user's
USER_CODE_CALLERS = frozenset({
    ("notebook_fabric.launching.rank.main", "run_task"),
    ("notebook_fabric.launching.api", "_call_launched_function"),
    ("notebook_fabric.magics.cell_task", "__call__"),
    ("notebook_fabric.stepping.post_mortem", "__call__"),
})


def _standard_pdb() -> type:
    """The standard library's ``pdb.Pdb``, even where a kernel replaced the module's attribute with
    IPython's debugger (a forked rank inherits that)."""
    for cls in pdb.Pdb.__mro__:
        if cls.__module__ == "pdb" and cls.__name__ == "Pdb":
            return cls
    return pdb.Pdb


_STANDARD_PDB = _standard_pdb()


class RankPdb(_STANDARD_PDB):  # type: ignore[misc, valid-type]
    """See the module docstring. ``rank`` is set by :func:`install`."""

    rank = 0

    def __init__(self, completekey: str = "tab", stdin: Any = None, stdout: Any = None,
                 skip: Optional[Iterable[str]] = None, nosigint: bool = False, readrc: bool = True) -> None:
        terminal = DebuggerTerminal()
        super().__init__(completekey, stdin or terminal, stdout or terminal,
                         skip=[*(skip or ()), f"{PACKAGE}.*"], nosigint=True, readrc=readrc)
        self.terminal = terminal
        self.prompt = f"(Pdb rank {self.rank}) "

    def stop_here(self, frame: FrameType) -> bool:
        return super().stop_here(frame) and in_user_code(frame)

    def get_stack(self, f: Optional[FrameType], t: Optional[TracebackType]) -> Tuple[List[Any], int]:
        stack, index = super().get_stack(f, t)
        start = 0
        for position, (frame, _) in enumerate(stack[:index]):
            if _calls_user_code(frame):
                start = position + 1
        return (stack[start:], index - start) if 0 < start <= index else (stack, index)

    def interaction(self, frame: Optional[FrameType], traceback: Optional[TracebackType]) -> None:
        try:
            super().interaction(frame, traceback)
        except PromptAborted:
            self._stop_tracing()
            raise KeyboardInterrupt("left the debugger: the notebook was interrupted") from None
        except StdinUnavailableError:
            self._stop_tracing()
            raise
        if traceback is not None or self.quitting or self.stoplineno == -1:  # post-mortem done, quit, continue
            prompter().left_debugger(self.terminal.take())

    def _stop_tracing(self) -> None:
        self.set_quit()
        prompter().left_debugger(self.terminal.take())


def _calls_user_code(frame: FrameType) -> bool:
    return (frame.f_globals.get("__name__"), frame.f_code.co_name) in USER_CODE_CALLERS


def in_user_code(frame: Optional[FrameType]) -> bool:
    """Whether ``frame`` runs on behalf of the user's code: walking outwards, the first
    notebook-fabric frame met is one that calls the user's code (or there is none)."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            return (module, frame.f_code.co_name) in USER_CODE_CALLERS
        frame = frame.f_back
    return True


def user_traceback(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """``tb`` without its leading notebook-fabric frames (the launcher's, the cell runner's)."""
    start = tb
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__") or ""
        if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
            return tb
        tb = tb.tb_next
    return start


def set_trace(*, header: Optional[str] = None) -> None:
    """``pdb.set_trace()`` in a rank: stop in the caller's frame."""
    debugger = RankPdb()
    if header is not None:
        debugger.message(header)
    debugger.set_trace(sys._getframe().f_back)


def breakpointhook(*args: Any, **kwargs: Any) -> Any:
    """``breakpoint()`` in a rank: the rank's pdb, unless ``PYTHONBREAKPOINT`` names another hook
    (``0`` turns breakpoints off, as in Python)."""
    if os.environ.get("PYTHONBREAKPOINT"):
        return sys.__breakpointhook__(*args, **kwargs)
    debugger = RankPdb()
    debugger.set_trace(sys._getframe().f_back)
    return None


def install(rank: int) -> None:
    """Make ``pdb.Pdb``, ``pdb.set_trace`` and ``breakpoint()`` the rank's, whatever the notebook
    had set before a fork (a kernel puts IPython's debugger and debugpy's hook there)."""
    RankPdb.rank = rank
    pdb.Pdb = RankPdb  # pdb.post_mortem(), pdb.pm() and code that builds ``pdb.Pdb()`` get it from here
    pdb.set_trace = set_trace
    sys.breakpointhook = breakpointhook
