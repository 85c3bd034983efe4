"""Inside a rank: every way Python asks for a line ends in one question to the notebook.

:func:`install` (run once by ``launching.rank.main`` when the rank has its channel) replaces

- ``builtins.input``: the prompt travels in the request, the typed line comes back;
- ``sys.stdin``: ``readline()`` asks with an empty prompt;
- ``pdb.Pdb``: with :class:`~.rank_pdb.RankPdb`, whose terminal is a :class:`DebuggerTerminal`
  (so ``breakpoint()``, ``pdb.set_trace()`` and ``pdb.post_mortem()`` all talk to the notebook).

A question is an :class:`~.messages.InputRequest` put in the outbox after the rank's output so
far (so what the rank printed comes first); the main thread then waits for the
:class:`~.messages.InputReply` that the control thread hands to :meth:`RankPrompter.deliver`. The
wait wakes twice a second, so a SIGINT from the notebook lands as KeyboardInterrupt.
"""
from __future__ import annotations

import builtins
import io
import itertools
import queue
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from .messages import DebuggerLeft, InputReply, InputRequest, StdinUnavailableError

_PROMPTER: Optional["RankPrompter"] = None


class PromptAborted(BaseException):
    """The notebook was interrupted while this rank waited at a prompt. A BaseException that is
    not a KeyboardInterrupt, so pdb's own ``except KeyboardInterrupt`` does not swallow it;
    :func:`rank_input` and :class:`~.rank_pdb.RankPdb` turn it into KeyboardInterrupt."""


class RankPrompter:
    """One per rank: sends questions, waits for their answers (one question at a time)."""

    def __init__(self, rank: int, send: Callable[[Any], None], flush_output: Callable[[], None]) -> None:
        self.rank = rank
        self._send = send
        self._flush_output = flush_output
        self._replies: "queue.SimpleQueue[InputReply]" = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._asking = threading.Lock()
        self.in_debugger = False  # a pdb prompt was shown and the debugger has not been left yet

    def deliver(self, reply: InputReply) -> None:
        """Called by the control thread for every :class:`InputReply`."""
        self._replies.put(reply)

    def ask(self, prompt: str, text: str = "", debugger: bool = False) -> str:
        """The line the notebook's user typed (without its newline).

        Raises EOFError (end of input), :class:`PromptAborted` (the notebook was interrupted) or
        :class:`StdinUnavailableError` (the notebook has no way to ask).
        """
        with self._asking:
            self._flush_output()
            request_id = next(self._ids)
            if debugger:
                self.in_debugger = True
            self._send(InputRequest(rank=self.rank, time=time.time(), request_id=request_id, prompt=prompt,
                                    text=text, debugger=debugger))
            reply = self._wait(request_id)
        if reply.abort:
            raise PromptAborted()
        if reply.unavailable:
            what = "the debugger" if debugger else f"input({prompt!r})"
            raise StdinUnavailableError(f"{what} on rank {self.rank} waits for a line from the notebook, but "
                                        f"{reply.unavailable}")
        if reply.eof:
            raise EOFError
        return reply.line

    def left_debugger(self, text: str = "") -> None:
        """Tell the notebook this rank no longer holds its attention (pdb continued or quit)."""
        if self.in_debugger or text:
            self._flush_output()
            self._send(DebuggerLeft(rank=self.rank, time=time.time(), text=text))
        self.in_debugger = False

    def _wait(self, request_id: int) -> InputReply:
        while True:
            try:
                reply = self._replies.get(timeout=0.5)
            except queue.Empty:
                continue
            if reply.request_id == request_id:  # an answer to an earlier, abandoned question is dropped
                return reply


def prompter() -> RankPrompter:
    """The rank's prompter (after :func:`install`)."""
    if _PROMPTER is None:
        raise RuntimeError("notebook-fabric prompts are only installed inside a rank")
    return _PROMPTER


def rank_input(prompt: object = "") -> str:
    """``input()`` in a rank: the notebook asks its user, showing the prompt with the rank's name."""
    try:
        return prompter().ask(str(prompt))
    except PromptAborted:
        raise KeyboardInterrupt("the notebook was interrupted while this rank waited for input") from None


class RankStdin(io.TextIOBase):
    """``sys.stdin`` of a rank: each line read is asked of the notebook (an empty prompt)."""

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def readline(self, size: Optional[int] = -1) -> str:  # type: ignore[override]
        try:
            return rank_input("") + "\n"
        except EOFError:
            return ""

    def read(self, size: Optional[int] = -1) -> str:
        lines: List[str] = []
        while True:
            line = self.readline()
            if not line:
                return "".join(lines)
            lines.append(line)
            if size is not None and 0 <= size <= sum(map(len, lines)):
                return "".join(lines)


class DebuggerTerminal(io.TextIOBase):
    """pdb's stdin and stdout in a rank: what pdb writes is held, and sent with its next question
    (the text after the last newline is the prompt), so the dialogue reaches the notebook whole
    and in order, even for ranks whose output the cell does not show."""

    def __init__(self) -> None:
        super().__init__()
        self._held: List[str] = []

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self._held.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        """Everything written since the last question (and forget it)."""
        text, self._held = "".join(self._held), []
        return text

    def readline(self, size: Optional[int] = -1) -> str:  # type: ignore[override]
        text = self.take()
        head, newline, prompt = text.rpartition("\n")
        try:
            return prompter().ask(prompt, text=head + newline, debugger=True) + "\n"
        except EOFError:
            return ""


def install(rank: int, send: Callable[[Any], None], flush_output: Callable[[], None]) -> RankPrompter:
    """Route ``input()``, ``sys.stdin`` and ``pdb`` of this rank to the notebook (see the module docstring)."""
    global _PROMPTER
    from . import rank_pdb

    _PROMPTER = RankPrompter(rank, send, flush_output)
    builtins.input = rank_input
    sys.stdin = RankStdin()
    rank_pdb.install(rank)
    return _PROMPTER


def deliver(reply: InputReply) -> bool:
    """Hand a reply to the waiting question; ``False`` outside a rank."""
    if _PROMPTER is None:
        return False
    _PROMPTER.deliver(reply)
    return True


def remember_failure(error: BaseException) -> None:
    """Keep a task's exception where ``pdb.pm()`` and ``%fabric debug`` look (``sys.last_traceback``),
    as an interactive interpreter does; a post-mortem session's own interrupt is not kept."""
    if getattr(error, "_nbf_from_post_mortem", False):
        return
    sys.last_type, sys.last_value, sys.last_traceback = type(error), error, error.__traceback__


def task_ended() -> None:
    """After every task: no debugger outlives it (tracing stops; the notebook is told it was left)."""
    import bdb

    tracer = sys.gettrace()
    if isinstance(getattr(tracer, "__self__", None), bdb.Bdb):
        sys.settrace(None)
    if _PROMPTER is not None and _PROMPTER.in_debugger:
        _PROMPTER.left_debugger()
