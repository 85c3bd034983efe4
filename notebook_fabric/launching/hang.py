"""In the notebook: a hang that is certain, found the moment it becomes so, and explained.

While some ranks still run a task, others may already have finished it, failed or died. A rank
still waiting in a collective that one of those ranks would have to join can then never go on,
whatever a threshold would say: the finished rank issues nothing more in this task. The run loop
asks the waiting ranks what they wait in (their ledger's current entry, Fabric's collectives and
torch's internal ones alike) and compares it with what the other ranks' ledgers show they issued.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..collectives.callsite import rank_zero_guard
from ..collectives.ledger import LedgerEntry, with_live_entry
from ..live.ranks import format_ranks_on
from .errors import LaunchError
from .frames import innermost_user_frame


class CollectiveHangError(LaunchError):
    """Some ranks wait in a collective that the other ranks can no longer join (they finished,
    failed or died). ``waiting`` maps each waiting rank to its ledger entry; ``ledgers`` holds every
    rank's ledger as far as it is known (see ``notebook_fabric.collectives.ledger_view``); ``hosts``
    each rank's host, where ranks run on other hosts."""

    def __init__(self, message: str, *, waiting: Dict[int, LedgerEntry], gone: Dict[int, str],
                 ledgers: Dict[int, Tuple[LedgerEntry, ...]], hosts: Optional[Dict[int, str]] = None) -> None:
        super().__init__(message)
        self.waiting = waiting
        self.gone = gone
        self.ledgers = ledgers
        self.hosts = dict(hosts or {})
        self.ranks = sorted(waiting)

    def ledger(self, last: Optional[int] = None) -> Any:
        """Every rank's ledger side by side (a :class:`~notebook_fabric.collectives.LedgerTable`)."""
        from ..collectives.ledger_view import LedgerTable

        return LedgerTable(self.ledgers, last, hosts=self.hosts)


@dataclass(frozen=True)
class Verdict:
    """The waiting ranks whose collective can never complete, and why."""

    waiting: Dict[int, LedgerEntry]
    gone: Dict[int, str]  # rank -> "finished the cell" / "failed: ValueError: ..." / "died: ..."


def _issued_up_to(ledger: Sequence[LedgerEntry], group: str) -> int:
    return max((e.last_seq for e in ledger if e.group == group), default=0)


def find_certain_hang(waiting: Dict[int, LedgerEntry], gone: Dict[int, str],
                      ledgers: Dict[int, Tuple[LedgerEntry, ...]]) -> Optional[Verdict]:
    """The ranks of ``waiting`` whose collective needs a rank of ``gone`` that never issued it.

    A gone rank whose ledger is unknown counts as not having issued it (it cannot any more)."""
    stuck: Dict[int, LedgerEntry] = {}
    culprits: Dict[int, str] = {}
    for rank, entry in waiting.items():
        if not entry.group_ranks and entry.group != "0":
            continue  # a group whose members are unknown: nothing is certain
        members = set(entry.group_ranks) if entry.group_ranks else None
        for other, how in gone.items():
            if members is not None and other not in members:
                continue
            known = ledgers.get(other)
            if known is not None and _issued_up_to(known, entry.group) >= entry.seq:
                continue  # it took part in this one: the waiting rank is about to go on
            stuck[rank] = entry
            culprits[other] = how
    return Verdict(waiting=stuck, gone=culprits) if stuck else None


def explain(verdict: Verdict, ledgers: Dict[int, Tuple[LedgerEntry, ...]], task_label: str,
            hosts: Optional[Dict[int, str]] = None) -> str:
    """The message of the :class:`CollectiveHangError` for ``verdict`` (naming each rank's host, where
    ``hosts`` knows it)."""
    lines = ["a collective can never complete (reported at once: no threshold needed):"]
    by_call: Dict[Tuple[Any, ...], List[int]] = {}
    for rank, entry in sorted(verdict.waiting.items()):
        by_call.setdefault((entry.describe(), entry.group), []).append(rank)
    for (text, _), ranks in by_call.items():
        lines.append(f"  {format_ranks_on(ranks, hosts)} {'waits' if len(ranks) == 1 else 'wait'} in {text}")
    for rank, how in sorted(verdict.gone.items()):
        entry = next(iter(verdict.waiting.values()))
        last = [e for e in ledgers.get(rank, ()) if e.group == entry.group]
        done = f"; its last collective there was {last[-1].describe()}" if last else "; it issued no collective there"
        verb = "" if how.startswith("is ") else " without calling it"
        lines.append(f"  {format_ranks_on([rank], hosts)} {how}{verb}{done if rank in ledgers else ''}")
    guards = {e.guard or rank_zero_guard(e.place) for e in verdict.waiting.values()} - {None}
    if guards:
        lines.append(f"  The call sits under `{sorted(guards)[0]}`, so only some ranks make it. It is a collective "
                     "(fabric.save, fabric.load and fabric.barrier are too): every rank must call it; "
                     "move it out of the `if` (fabric.save already writes on rank 0 only).")
    else:
        lines.append(f"  Every rank must issue the same collectives in the same order within {task_label}.")
    return "\n".join(lines)


def task_label(task: Any) -> str:
    """"the cell" for a %%fabric cell, else "the function"."""
    return "the cell" if type(task).__name__ == "CellTask" else "the function"


def describe_gone(kind: str, label: str, detail: str = "") -> str:
    """``finished the cell``, ``failed (ValueError: x)``, ``died (killed by SIGKILL)``."""
    if kind == "finished":
        return f"finished {label}"
    return f"{kind}" + (f" ({detail})" if detail else "")


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')


def entry_at_failure(entries: Sequence[LedgerEntry], traceback_text: str,
                     others: Optional[Dict[int, Tuple[LedgerEntry, ...]]] = None) -> Optional[LedgerEntry]:
    """The collective a rank was in when its task raised (the newest entry not finished), with the
    user's line from the traceback when the ledger has none (torch-internal collectives).

    When its peer left, gloo may count the failed collective as completed: then the newest entry
    is it, if some other rank (``others``' ledgers) never issued it."""
    open_entries = [e for e in entries if e.state != "finished"]
    newest = max(entries, key=lambda e: e.started_ns) if entries else None
    peer_gone = any(marker in traceback_text for marker in _PEER_GONE)
    if open_entries:
        entry = max(open_entries, key=lambda e: e.started_ns)
    elif peer_gone and newest is not None and others and any(
            _issued_up_to(ledger, newest.group) < newest.seq for ledger in others.values()):
        entry = replace(newest, state="failed")
    else:
        entry = _refused_collective(entries, traceback_text)
        if entry is None:
            return None
    if entry.place is None:
        frame = innermost_user_frame(traceback_text)
        found = _FRAME.search(frame) if frame else None
        if found:
            entry = replace(entry, place=(found["file"], int(found["line"]), found["name"]),
                            via=entry.via or _issuer_from_traceback(entry.op, traceback_text))
    return entry


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
_C10D_CALL = re.compile(r'File "[^"]*torch/distributed/distributed_c10d\.py", line \d+, in (?P<name>\w+)')


def _refused_collective(entries: Sequence[LedgerEntry], traceback_text: str) -> Optional[LedgerEntry]:
    """The collective the backend refused to start because a peer had left (it never reached the
    Flight Recorder): named from the traceback, numbered after the last one on the world group."""
    if not any(marker in traceback_text for marker in _PEER_GONE):
        return None
    calls = _C10D_CALL.findall(traceback_text)
    if not calls:
        return None
    op = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
          "reduce_scatter_tensor": "reduce_scatter", "_all_gather_base": "all_gather"}.get(calls[-1], calls[-1])
    world = [e for e in entries if e.group == "0"]
    seq = max((e.last_seq for e in world), default=0) + 1
    ranks = world[-1].group_ranks if world else ()
    return LedgerEntry(seq=seq, last_seq=seq, op=op, group="0", group_ranks=ranks, shapes=(), dtypes=(),
                       reduce_op=None, src=None, name=None, state="failed", origin="torch", place=None,
                       started_ns=0)


def _issuer_from_traceback(op: str, text: str) -> Optional[str]:
    from ..collectives.ledger import issuer

    return issuer(op, [m["file"] for m in _FRAME.finditer(text)])


def torch_debug_note(last_words: str) -> Optional[str]:
    """What to say when a rank crashed with ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` set: torch 2.13's DDP
    constructor segfaults on CPU under it (measured with plain torch.distributed, no notebook-fabric)."""
    import os

    if os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() != "DETAIL":
        return None
    if "_ddp_init_helper" in last_words or "distributed.py" in last_words:
        return ("TORCH_DISTRIBUTED_DEBUG=DETAIL is set: this torch's DDP crashes in its constructor on CPU with it. "
                "Unset it and use Fabric(debug=True) (%%fabric --debug), which compares every collective's op, "
                "shapes, dtypes and source across ranks.")
    return "TORCH_DISTRIBUTED_DEBUG=DETAIL was set in the ranks; the crash may come from torch's debug wrapper."


# -- what the run loop asks (it owns the waiting; these look at the ranks and decide) ------------------
def check_waiting(world: Any, pending: Iterable[int], finished: Iterable[int], idle: Iterable[int],
                  label: str) -> Optional[CollectiveHangError]:
    """The error for pending ranks waiting in a collective a finished or idle rank never issued."""
    replies = world.where(timeout=1.0)
    waiting = {r: replies[r].waiting for r in sorted(pending)
               if r in replies and getattr(replies[r], "waiting", None) is not None}
    gone = {r: describe_gone("finished", label) for r in finished}
    gone.update({r: f"is not running {label} (--ranks)" for r in idle})
    verdict = find_certain_hang(waiting, gone, world.ledgers) if waiting else None
    if verdict is None:
        return None
    for rank, reply in world.where(timeout=1.0, ledger=True).items():
        if reply.ledger is not None:
            world.ledgers[rank] = with_live_entry(reply.ledger, waiting.get(rank))
    ledgers, hosts = dict(world.ledgers), world.hosts
    return CollectiveHangError(explain(verdict, ledgers, label, hosts), waiting=verdict.waiting, gone=verdict.gone,
                               ledgers=ledgers, hosts=hosts)


def explain_failures(world: Any, failures: Dict[int, Any], finished: Iterable[int],
                     label: str) -> Tuple[Optional[CollectiveHangError], Optional[str]]:
    """Ranks failed inside a collective (the backend saw its peer leave) that another rank never issued.

    When that rank finished the task: ``(CollectiveHangError, None)``, the same certain hang explained
    the same way. When it failed elsewhere first: ``(None, story)``, a note for its own exception."""
    finished = list(finished)
    waiting = {}
    for rank, failure in failures.items():
        others = {r: e for r, e in world.ledgers.items() if r != rank and (r in finished or r in failures)}
        entry = entry_at_failure(world.ledgers.get(rank, ()), failure.traceback, others)
        if entry is not None:
            waiting[rank] = entry
    gone = {r: describe_gone("finished", label) for r in finished}
    gone.update({r: describe_gone("failed", label, f.summary) for r, f in failures.items() if r not in waiting})
    verdict = find_certain_hang(waiting, gone, world.ledgers) if waiting and gone else None
    if verdict is None:
        return None, None
    ledgers, hosts = dict(world.ledgers), world.hosts
    story = explain(verdict, ledgers, label, hosts)
    if any(rank in failures for rank in verdict.gone):
        return None, story.replace("a collective can never complete (reported at once: no threshold needed):",
                                   "because of it, a collective could never complete:")
    error = CollectiveHangError(story, waiting=verdict.waiting, gone=verdict.gone, ledgers=ledgers, hosts=hosts)
    for rank in sorted(verdict.waiting):
        error.add_note(f"the backend then gave up on rank {rank}: {failures[rank].summary}")
    return error, None


def waiting_note(world: Any, pending: Iterable[int]) -> Optional[str]:
    """One line for an exception note: who waited in what when the others failed or died."""
    try:
        replies = world.where(timeout=0.5)
    except Exception:  # noqa: BLE001 - a note only
        return None
    waiting = {r: replies[r].waiting for r in sorted(pending)
               if r in replies and getattr(replies[r], "waiting", None) is not None}
    if not waiting:
        return None
    parts = [f"{format_ranks_on([r], world.hosts)} waited in {e.describe()}" for r, e in sorted(waiting.items())]
    return "meanwhile " + "; ".join(parts) + ", which could not complete"


__all__ = ["CollectiveHangError", "Verdict", "find_certain_hang", "explain", "task_label", "describe_gone",
           "check_waiting", "explain_failures", "waiting_note", "entry_at_failure", "torch_debug_note"]
