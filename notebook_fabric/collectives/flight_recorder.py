"""PyTorch's Flight Recorder, read from Python: the collectives torch issued, its own included.

DDP's parameter broadcasts and gradient bucket all-reduces, FSDP's all-gathers and
reduce-scatters never pass through ``notebook_fabric.collectives``; torch records them in its
Flight Recorder (a ring buffer in c10d) when ``TORCH_FR_BUFFER_SIZE`` is set before the process
group is created. :func:`enable` sets it (ranks do this before building their Fabric), :func:`read`
returns what it holds. With gloo every entry says ``scheduled``; whether a collective finished is
told by the group's ``last_completed_collective`` (``retired`` also marks failed work whose handle
was dropped).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

BUFFER_VARIABLE = "TORCH_FR_BUFFER_SIZE"
DEFAULT_BUFFER = 2000


@dataclass(frozen=True)
class RecordedCollective:
    """One Flight Recorder entry, in plain values."""

    pg_id: str
    seq: int
    op: str  # "all_reduce", "broadcast", ... (the backend prefix removed)
    input_sizes: Tuple[Tuple[int, ...], ...]
    input_dtypes: Tuple[str, ...]
    created_ns: int
    finished: bool
    thread_name: str


@dataclass(frozen=True)
class Recording:
    """Everything read at once: the entries and, per process group, the last enqueued and completed sequence ids."""

    entries: Tuple[RecordedCollective, ...]
    enqueued: Dict[str, int]
    completed: Dict[str, int]

    def waiting(self) -> List[RecordedCollective]:
        """Entries issued but not finished (with gloo: past the group's last completed id)."""
        return [e for e in self.entries if not e.finished and e.seq > self.completed.get(e.pg_id, -1)]


def enable(buffer_size: int = DEFAULT_BUFFER) -> bool:
    """Ask torch to record collectives (only works before ``init_process_group``); ``True`` if it is set."""
    os.environ.setdefault(BUFFER_VARIABLE, str(buffer_size))
    return is_enabled()


def is_enabled() -> bool:
    try:
        return int(os.environ.get(BUFFER_VARIABLE, "0")) > 0
    except ValueError:
        return False


def read() -> Optional[Recording]:
    """What the Flight Recorder holds now, or ``None`` when it is off or unavailable."""
    if not is_enabled():
        return None
    try:
        import torch

        raw = torch._C._distributed_c10d._dump_fr_trace_json()
        data = json.loads(raw)
    except Exception:  # noqa: BLE001 - an old torch or a build without c10d
        return None
    return parse(data)


def parse(data: dict) -> Recording:
    """A :class:`Recording` from the JSON ``_dump_fr_trace_json`` returns."""
    enqueued: Dict[str, int] = {}
    completed: Dict[str, int] = {}
    for pg_id, status in (data.get("pg_status") or {}).items():
        enqueued[str(pg_id)] = int(status.get("last_enqueued_collective", -1))
        completed[str(pg_id)] = int(status.get("last_completed_collective", -1))
    entries = []
    for item in data.get("entries", ()):
        group = item.get("process_group") or ["0"]
        name = str(item.get("profiling_name", ""))
        pg_id, seq = str(group[0]), int(item.get("collective_seq_id", 0))
        if pg_id in completed:  # the group's own count; ``retired`` also marks failed work whose handle went away
            finished = seq <= completed[pg_id]
        else:
            finished = bool(item.get("retired")) or item.get("state") == "completed"
        entries.append(RecordedCollective(
            pg_id=pg_id, seq=seq,
            op=name.split(":", 1)[-1] if ":" in name else name,
            input_sizes=tuple(tuple(int(d) for d in size) for size in item.get("input_sizes", ())),
            input_dtypes=tuple(str(d) for d in item.get("input_dtypes", ())),
            created_ns=int(item.get("time_created_ns", 0)),
            finished=finished,
            thread_name=str(item.get("thread_name", "")),
        ))
    return Recording(entries=tuple(entries), enqueued=enqueued, completed=completed)
