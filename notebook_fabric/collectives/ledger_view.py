"""The ranks' collective ledgers side by side, aligned by sequence number, the first divergence marked.

::

      group  seq | rank 0                        | rank 1                        | where
      world  #1  | all_reduce float32[3]  done   | all_reduce float32[3]  done   | cell line 3
   >> world  #2  | barrier  WAITING              | -                             | cell line 5: fabric.save(...)

A row diverges when some rank lacks the collective or the ranks' calls differ (op, shapes,
dtypes, reduce op, src). When ranks run on other hosts (a cluster's), each rank's column names its
host (``rank 2 @ nfnode2``), as the dashboard's host column does. Used by ``%fabric ledger``,
:func:`last_ledger` and ``CollectiveHangError.ledger()``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .ledger import LedgerEntry

_STATES = {"finished": "done", "issued": "WAITING", "failed": "FAILED"}
Key = Tuple[str, int]


def _group_label(group: str) -> str:
    return "world" if group == "0" else f"pg {group}"


def _cell(entry: Optional[LedgerEntry]) -> str:
    if entry is None:
        return "-"
    tensors = entry.tensors()
    if entry.origin == "fabric":
        name = entry.op
    else:  # issued inside torch: who issued it, when known ("DDP's gradient all-reduce" -> "DDP:all_reduce")
        name = f"{entry.via.split(chr(39))[0]}:{entry.op}" if entry.via else f"torch:{entry.op}"
    return f"{name} {tensors} {_STATES.get(entry.state, entry.state)}".replace("  ", " ")


def align(ledgers: Mapping[int, Sequence[LedgerEntry]]) -> Tuple[List[Key], Dict[int, Dict[Key, LedgerEntry]]]:
    """The sorted (group, seq) keys every rank's entries fall on, and each rank's entries by key."""
    by_rank: Dict[int, Dict[Key, LedgerEntry]] = {}
    keys = set()
    for rank, entries in ledgers.items():
        table = {}
        for entry in entries:
            table[(entry.group, entry.seq)] = entry
            keys.add((entry.group, entry.seq))
        by_rank[rank] = table
    ordered = sorted(keys, key=lambda k: (int(k[0]) if k[0].isdigit() else 10**9, k[1]))
    return ordered, by_rank


def first_divergence(ledgers: Mapping[int, Sequence[LedgerEntry]]) -> Optional[Key]:
    """The first (group, seq) where the ranks' ledgers disagree, or ``None``.

    Only rows every rank's ledger could hold count: above each rank's oldest kept entry (ledgers
    keep their newest entries)."""
    keys, by_rank = align(ledgers)
    oldest = {rank: min((k[1] for k in table), default=0) for rank, table in by_rank.items()}
    for key in keys:
        present = {rank: table.get(key) for rank, table in by_rank.items() if key[1] >= oldest[rank]}
        members = _members(present.values())
        relevant = {r: e for r, e in present.items() if members is None or r in members}
        if len(relevant) < 2 and members is not None and len(members) < 2:
            continue
        signatures = {None if e is None else e.signature() for e in relevant.values()}
        if len(signatures) > 1:
            return key
    return None


def _members(entries: Sequence[Optional[LedgerEntry]]) -> Optional[set]:
    for entry in entries:
        if entry is not None and entry.group_ranks:
            return set(entry.group_ranks)
    return None


def rank_label(rank: int, hosts: Optional[Mapping[int, str]] = None) -> str:
    """A rank's column heading: ``rank 2``, or ``rank 2 @ nfnode2`` when ``hosts`` knows its host."""
    host = (hosts or {}).get(rank)
    return f"rank {rank} @ {host}" if host else f"rank {rank}"


def side_by_side(ledgers: Mapping[int, Sequence[LedgerEntry]], last: Optional[int] = None, width: int = 36,
                 hosts: Optional[Mapping[int, str]] = None) -> str:
    """The table (see the module docstring); ``last`` keeps only the newest ``last`` rows; ``hosts``
    (rank -> host, for ranks on other hosts) puts each rank's host in its column's heading."""
    if not ledgers:
        return "no collective ledger yet (run something on the ranks first)"
    keys, by_rank = align(ledgers)
    diverge = first_divergence(ledgers)
    ranks = sorted(by_rank)
    if last is not None and last > 0:
        keep = keys[-last:]
        if diverge is not None and diverge not in keep:
            keep = [diverge] + keep
        keys = keep
    headings = " | ".join(f"{rank_label(r, hosts)[:width]:<{width}}" for r in ranks)
    header = f"   {'group':<6} {'seq':>5} | {headings} | where"
    lines = [header, "-" * len(header)]
    for key in keys:
        entries = [by_rank[r].get(key) for r in ranks]
        placed = next((e for e in entries if e is not None and e.place is not None), None)
        mark = ">> " if key == diverge else "   "
        cells = " | ".join(f"{_cell(e)[:width]:<{width}}" for e in entries)
        where = placed.where() if placed is not None else ""
        lines.append(f"{mark}{_group_label(key[0]):<6} {'#' + str(key[1]):>5} | {cells} | {where}")
    if diverge is not None:
        lines.append(f">> first divergence: {_group_label(diverge[0])} #{diverge[1]}")
    else:
        lines.append("the ranks' ledgers agree")
    return "\n".join(lines)


class LedgerTable:
    """Every rank's ledger of one run; shows as the side-by-side table (``str``, ``repr``, notebooks).
    ``hosts``: rank -> host for ranks on other hosts (empty on one machine)."""

    def __init__(self, ledgers: Mapping[int, Sequence[LedgerEntry]], last: Optional[int] = None,
                 hosts: Optional[Mapping[int, str]] = None) -> None:
        self.ledgers: Dict[int, Tuple[LedgerEntry, ...]] = {r: tuple(e) for r, e in sorted(ledgers.items())}
        self.last = last
        self.hosts: Dict[int, str] = {r: h for r, h in (hosts or {}).items() if h}

    @property
    def first_divergence(self) -> Optional[Key]:
        """``(group, seq)`` of the first row where the ranks disagree, or ``None``."""
        return first_divergence(self.ledgers)

    def __str__(self) -> str:
        return side_by_side(self.ledgers, self.last, hosts=self.hosts)

    __repr__ = __str__

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:
        printer.text(str(self))  # type: ignore[attr-defined]


_LAST_RUN: Dict[int, Tuple[LedgerEntry, ...]] = {}
_LAST_HOSTS: Dict[int, str] = {}


def remember(ledgers: Mapping[int, Sequence[LedgerEntry]], hosts: Optional[Mapping[int, str]] = None) -> None:
    """Keep the ledgers of the launch that just ended (its ranks are gone) for :func:`last_ledger`, with
    the ranks' hosts where they ran on other hosts."""
    _LAST_RUN.clear()
    _LAST_RUN.update({rank: tuple(entries) for rank, entries in ledgers.items()})
    _LAST_HOSTS.clear()
    _LAST_HOSTS.update(hosts or {})


def last_ledger(last: Optional[int] = None) -> LedgerTable:
    """The collective ledgers of the last ``launch(fn)`` run in this process, side by side."""
    return LedgerTable(_LAST_RUN, last, hosts=_LAST_HOSTS)
