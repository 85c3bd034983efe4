"""How failures in ranks reach the caller: as the original exception where possible, else ours.

A rank that raises sends a :class:`~notebook_fabric.live.events.RemoteFailure`; the notebook
groups identical failures ("ranks 1-3: ValueError: ...") and re-raises the first one as its
original type, with ``rank``, ``ranks`` and ``remote_traceback`` attributes, a note naming the
ranks, and the rank's traceback chained as ``__cause__`` (a :class:`RemoteTraceback`).
"""
from __future__ import annotations

import os
import pickle
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..live.events import CollectiveState, RemoteFailure
from ..live.fold import fold_frames
from ..live.ranks import format_ranks, format_ranks_on  # noqa: F401 - format_ranks is also re-exported here


class LaunchError(RuntimeError):
    """Base class of the launcher's own errors."""


class RemoteTraceback(Exception):
    """The traceback a rank saw, shown as the cause of the re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class RankFailedError(LaunchError):
    """A rank raised an exception that could not be rebuilt in the notebook (e.g. unpicklable)."""

    def __init__(self, message: str, *, rank: int, ranks: Sequence[int], type_name: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.ranks = list(ranks)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RankDiedError(LaunchError):
    """A rank process ended without an exception: ``os._exit``, a signal, the OOM killer."""

    def __init__(self, message: str, *, rank: int, exitcode: Optional[int], ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rank = rank
        self.ranks = list(ranks) or [rank]
        self.exitcode = exitcode
        self.signal: Optional[int] = -exitcode if exitcode is not None and exitcode < 0 else None


class LaunchTimeoutError(LaunchError, TimeoutError):
    """The run outlived its ``timeout``; says which ranks wait in which collective, and where the rest are.

    At start-up: ``never_connected`` (ranks that never reached the notebook) and ``not_joined``
    (ranks that reached it but never got their Fabric ready, usually waiting for the others in
    the process group).
    """

    def __init__(self, message: str, *, waiting: Dict[int, CollectiveState], elsewhere: Dict[int, str],
                 stacks: Dict[int, str], never_connected: Sequence[int] = (), not_joined: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.waiting = waiting
        self.elsewhere = elsewhere
        self.stacks = stacks
        self.never_connected = list(never_connected)
        self.not_joined = list(not_joined)


class SupervisorCrashedError(LaunchError):
    """The notebook's thread that reads the ranks' messages crashed: nothing hears the ranks any more.

    ``rank``: whose message it was reading (``None`` if it crashed elsewhere); the crash is the
    ``__cause__``."""

    def __init__(self, message: str, *, rank: Optional[int]) -> None:
        super().__init__(message)
        self.rank = rank


class PoolClosedError(LaunchError):
    """The pool was stopped (or broke) and must be started again."""


def group_failures(failures: Dict[int, RemoteFailure], arrival: Sequence[int]) -> List[Tuple[List[int], RemoteFailure]]:
    """Identical failures (same type and message) grouped, groups in order of first arrival."""
    groups: Dict[Tuple[str, str], Tuple[List[int], RemoteFailure]] = {}
    for rank in list(arrival) + sorted(set(failures) - set(arrival)):
        failure = failures[rank]
        key = (failure.qualified_type, failure.message)
        if key not in groups:
            groups[key] = ([], failure)
        if rank not in groups[key][0]:
            groups[key][0].append(rank)
    return [(sorted(ranks), failure) for ranks, failure in groups.values()]


def summarize_failures(groups: Sequence[Tuple[List[int], RemoteFailure]]) -> str:
    """One line per group: ``"ranks 1-3: ValueError: bad value"``."""
    return "\n".join(f"{format_ranks(ranks)}: {failure.summary}" for ranks, failure in groups)


def rebuild_exception(failures: Dict[int, RemoteFailure], arrival: Sequence[int]) -> BaseException:
    """The exception to raise in the notebook for these rank failures (see the module docstring)."""
    groups = group_failures(failures, arrival)
    ranks, failure = groups[0]
    rank = ranks[0]
    on_host = f" on host {failure.host}" if failure.host else ""
    hosts = {r: f.host for r, f in failures.items() if f.host}  # ranks on other hosts: each its own
    where = format_ranks_on(ranks, hosts) + (" (identical failures shown once)" if len(ranks) > 1 else "")
    exc = _unpickle(failure)
    if exc is None:
        exc = RankFailedError(f"{failure.qualified_type} on {where}: {failure.message}", rank=rank, ranks=ranks,
                              type_name=failure.qualified_type, remote_traceback=failure.traceback)
    for name, value in (("rank", rank), ("ranks", ranks), ("remote_traceback", failure.traceback)):
        try:
            setattr(exc, name, value)
        except (AttributeError, TypeError):
            pass
    note = f"raised on {where}"
    if len(groups) > 1:
        note += "; other ranks failed too:\n" + summarize_failures(groups[1:])
    _add_note(exc, note)
    header = f"Traceback on {format_ranks([rank])}{on_host}" + (f" ({format_ranks(ranks)} failed the same way)" if len(ranks) > 1 else "")
    exc.__cause__ = RemoteTraceback(f"{header}:\n{fold_frames(failure.traceback).rstrip()}")
    return exc


def describe_exception(exc: BaseException, skip_frames_in: Sequence[str] = ()) -> RemoteFailure:
    """Turn ``exc`` (caught in a rank) into a :class:`RemoteFailure` that pickles for sure.

    Frames at the top of the traceback whose file lies under one of ``skip_frames_in`` (the
    launcher's own code) are left out, so the traceback starts at the user's function.
    """
    import traceback

    tb = exc.__traceback__
    while tb is not None and any(tb.tb_frame.f_code.co_filename.startswith(p) for p in skip_frames_in):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        message = f"<{type(exc).__name__} with an unprintable message>"
    return RemoteFailure(type_name=type(exc).__qualname__, module=type(exc).__module__ or "",
                         message=message, traceback=text, pickled=pickle_for_parent(exc, verify=True),
                         host=os.environ.get("NOTEBOOK_FABRIC_HOST", ""))


def pickle_for_parent(obj: object, verify: bool = False) -> Optional[bytes]:
    """Pickle ``obj`` to send to the notebook; ``None`` if it cannot be.

    The standard pickler goes first: it refers to classes by name, so a class defined in the
    notebook comes back as that same class (under fork). cloudpickle takes what it refuses.
    ``verify`` also unpickles it here (exceptions with unusual constructors fail at that step).
    """
    from notebook_fabric.utilities import by_value

    for dumps in (lambda o: pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL), by_value.dumps):
        try:
            data = dumps(obj)
            if verify:
                pickle.loads(data)
            return data
        except Exception:
            continue
    return None


def _unpickle(failure: RemoteFailure) -> Optional[BaseException]:
    if failure.pickled is None:
        return None
    try:
        exc = pickle.loads(failure.pickled)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None


def _add_note(exc: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover - older Pythons show the note in the cause instead
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list):
            notes.append(note)
