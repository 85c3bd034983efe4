"""In the notebook: the text the magics show (values per rank, tracebacks per rank, status, stacks).

Everything here returns strings; the IPython layer decides where they go. Identical things on
several ranks are shown once, headed by the ranks (``ranks 0-3:``), as the launcher does for errors.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from notebook_fabric.launching.errors import format_ranks, group_failures
from notebook_fabric.live.events import RemoteFailure
from notebook_fabric.live.fold import fold_frames
from notebook_fabric.live.stall import plain_stacks

from .cell_task import CellValue

MAGICS_DIR = os.path.dirname(os.path.abspath(__file__))
CELL_PREFIX = "<fabric-cell-"
_OWN_ERRORS = ("SubsetCollectiveError",)
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+')


class RemoteRepr:
    """Stands in for a rank's value that could not travel: shows the rank's ``repr``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class RankValues(dict):
    """``{rank: value}`` of a cell's last expression; displays grouped by identical ``repr``.

    It is what a ``%%fabric`` cell returns, so IPython shows it as the cell's ``Out`` and keeps it
    in ``_``: ``_[1]`` is rank 1's value.
    """

    def __init__(self, values: Dict[int, CellValue]) -> None:
        super().__init__({rank: _load(value) for rank, value in sorted(values.items())})
        self._texts = {rank: value.text for rank, value in values.items()}

    def __repr__(self) -> str:
        return format_values(self._texts)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _load(value: CellValue) -> Any:
    if value.payload is not None:
        try:
            return pickle.loads(value.payload)
        except Exception:
            pass
    return RemoteRepr(value.text)


def format_values(texts: Dict[int, str]) -> str:
    """One block per distinct ``repr``: ``[rank 0] 0`` or ``[ranks 0-1]`` + a multi-line repr."""
    groups: Dict[str, List[int]] = {}
    for rank, text in sorted(texts.items()):
        groups.setdefault(text, []).append(rank)
    blocks = []
    for text, ranks in groups.items():
        label = f"[{format_ranks(ranks)}]"
        blocks.append(f"{label} {text}" if "\n" not in text else f"{label}\n{text}")
    return "\n".join(blocks)


def clean_traceback(text: str, hidden_dirs: Sequence[str] = (MAGICS_DIR,), cells_only: bool = False) -> str:
    """Drop the frames of the magic's own code (running the cell), keeping the cell's and libraries'.

    ``cells_only`` keeps only the frames of ``%%fabric`` cells (for errors the magic raises itself,
    where the library frames between the cell and the check say nothing).
    """
    lines = text.splitlines()
    kept: List[str] = []
    skipping = False
    for line in lines:
        match = _FRAME.match(line)
        if match:
            filename = match.group("file")
            skipping = (any(filename.startswith(d) for d in hidden_dirs)
                        or (cells_only and not filename.startswith(CELL_PREFIX)))
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    return fold_frames("\n".join(kept))


def format_failures(failures: Dict[int, RemoteFailure], arrival: Sequence[int], running: Sequence[int],
                    *, skip_interrupts: bool = False) -> List[str]:
    """Per group of identical failures: a header naming the ranks, then that traceback."""
    lines: List[str] = []
    for ranks, failure in group_failures(failures, arrival):
        if skip_interrupts and failure.type_name == "KeyboardInterrupt":
            continue
        same = " (identical on each)" if len(ranks) > 1 else ""
        traceback = clean_traceback(failure.traceback, cells_only=failure.type_name in _OWN_ERRORS).rstrip()
        lines.append(f"--- {format_ranks(ranks)}{same}:" if traceback else f"--- {format_ranks(ranks)}{same}: {failure.summary}")
        lines.extend(traceback.splitlines())
    others = sorted(set(running) - set(failures))
    if others and lines:
        lines.append(f"--- {format_ranks(others)}: no error")
    return lines


def format_stacks(stacks: Dict[int, str]) -> str:
    """Every rank's stack, one block per rank (identical idle ranks grouped)."""
    return plain_stacks(stacks, clean=clean_traceback, label=format_ranks)


def format_bytes(count: Optional[int]) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def format_table(header: Tuple[str, ...], rows: Iterable[Tuple[str, ...]]) -> str:
    """A plain text table with left-aligned columns."""
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)
