"""The collective ledger of a rank: every collective it issued, Fabric's own and torch's internal ones.

One sequence numbering: torch's own per-process-group collective sequence id (the one the Flight
Recorder shows as ``collective_seq_id``). A collective through ``fabric.*`` reads its group's
counter as it starts (``#seq``; one Fabric call may issue several torch collectives, e.g.
``all_gather_object``, and then covers ``#seq..#last``). Collectives torch issues itself (DDP's
broadcasts and gradient bucket all-reduces, FSDP's all-gathers) come from the Flight Recorder when
the ledger is read, so recording costs the training loop only what Fabric's own calls need.

:class:`LedgerTracer` records (it sits in the tracer chain, see :mod:`.trace`);
:meth:`Ledger.entries` merges both sources, sorted by group and sequence number.
"""
from __future__ import annotations

import collections
import time
from types import FrameType
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple

import torch.distributed as _dist

from . import flight_recorder
from .callsite import Place, describe_place, place_of, rank_zero_guard, source_line, user_place
from .trace import Tracer

MAX_CALLS = 4000
_ONE_COLLECTIVE = frozenset({"all_reduce", "all_gather", "broadcast"})  # on tensors: exactly one torch collective


@dataclass(frozen=True)
class LedgerEntry:
    """One collective as the ledger shows it (plain values: it travels to the notebook)."""

    seq: int
    last_seq: int
    op: str
    group: str  # process group id ("0" is the world)
    group_ranks: Tuple[int, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    reduce_op: Optional[str]
    src: Optional[int]
    name: Optional[str]
    state: str  # "issued" | "finished" | "failed"
    origin: str  # "fabric" (through fabric.*) | "torch" (issued inside torch: DDP, FSDP, ...)
    place: Optional[Place]
    started_ns: int
    via: Optional[str] = None  # who issued a torch-internal one, when known: "DDP's gradient all-reduce"
    code: str = ""  # the source line at ``place`` (read in the rank, which has the cells' source)
    guard: Optional[str] = None  # the enclosing ``if`` when it tests for rank zero (``if fabric.is_global_zero:``)

    def tensors(self) -> str:
        """``float32[4, 8]``, several joined by ``, ``; ``object`` for pickled objects."""
        parts = [f"{_short_dtype(d)}{list(s)}" for s, d in zip(self.shapes, self.dtypes)]
        return ", ".join(parts) or ("object" if "object" in self.dtypes else "")

    def where(self) -> str:
        """``cell line 9: fabric.backward(loss)``: the place, with its source line."""
        text = describe_place(self.place, with_source=not self.code)
        return f"{text}: {self.code}" if self.code else text

    def bucket(self) -> str:
        """``bucket of 36 float32`` for DDP's gradient all-reduce, else ``""``."""
        if self.via != "DDP's gradient all-reduce" or len(self.shapes) != 1:
            return ""
        count = 1
        for size in self.shapes[0]:
            count *= size
        return f"bucket of {count} {_short_dtype(self.dtypes[0]) if self.dtypes else 'values'}"

    def signature(self) -> Tuple[Any, ...]:
        """What must agree across ranks for this collective to complete."""
        return (self.op, self.group, self.shapes, self.dtypes, self.reduce_op, self.src)

    def describe(self, with_place: bool = True) -> str:
        """``all_reduce #17 (float32[4, 8], reduce_op=sum) at cell line 9: fabric.all_reduce(x)``."""
        detail = [self.tensors()] if self.tensors() else []
        if self.bucket():
            detail = [self.bucket()]
        if self.name:
            detail.insert(0, f"name={self.name!r}")
        if self.reduce_op:
            detail.append(f"reduce_op={self.reduce_op}")
        if self.src is not None:
            detail.append(f"src={self.src}")
        label = self.op if self.origin == "fabric" else (self.via or f"torch-internal {self.op}")
        text = f"{label} #{self.seq}" + (f"-{self.last_seq}" if self.last_seq > self.seq else "")
        text += f" ({', '.join(detail)})" if detail else ""
        if with_place and self.place is not None:
            text += f" at {self.where()}"
        return text


class _Call:
    """A Fabric collective as recorded on the hot path (mutable, slots: cheap)."""

    __slots__ = ("seq", "last_seq", "op", "meta", "group", "place", "started_ns", "ended_ns", "error")

    def __init__(self, seq: int, op: str, meta: dict, group: Any, place: Optional[Place]) -> None:
        self.seq = seq
        self.last_seq = seq
        self.op = op
        self.meta = meta
        self.group = group
        self.place = place
        self.started_ns = time.time_ns()
        self.ended_ns = 0
        self.error: Optional[str] = None


class Ledger:
    """The per-rank ledger (see the module docstring)."""

    def __init__(self, max_calls: int = MAX_CALLS) -> None:
        self.calls: Deque[_Call] = collections.deque(maxlen=max_calls)
        self.count = 0  # Fabric calls recorded so far (the deque keeps the newest ``max_calls``)
        self.ignore_groups: set = set()  # process groups of notebook-fabric's own checks (debug mode)
        self._fallback: Dict[str, int] = {}

    # -- recording (hot path) -------------------------------------------------------------------
    def begin(self, op: str, meta: dict, depth: int = 3) -> _Call:
        """Record the call; sets ``meta["seq"]`` (before the call is visible to the heartbeat's thread)."""
        group = meta.get("group")
        call = _Call(self._next_seq(group), op, meta, group, user_place(depth))
        meta["seq"] = call.seq
        self.calls.append(call)
        self.count += 1
        return call

    def end(self, call: _Call, error: Optional[BaseException]) -> None:
        call.ended_ns = time.time_ns()
        if error is not None or call.op not in _ONE_COLLECTIVE or "object" in (call.meta.get("dtypes") or ()):
            call.last_seq = max(call.seq, _group_seq(call.group, call.seq - 1))  # it may have issued several
        if error is not None:
            call.error = f"{type(error).__name__}: {error}"

    def _next_seq(self, group: Any) -> int:
        current = _group_seq(group, None)
        if current is not None:
            return current + 1
        key = _group_id(group)
        self._fallback[key] = self._fallback.get(key, 0) + 1
        return self._fallback[key]

    # -- reading ----------------------------------------------------------------------------------
    def entries(self, recording: Optional["flight_recorder.Recording"] = None) -> List[LedgerEntry]:
        """Every collective known, Fabric's and torch's, sorted by group then sequence number."""
        if recording is None:
            recording = flight_recorder.read()
        out: List[LedgerEntry] = []
        covered: Dict[str, List[Tuple[int, int]]] = {}
        for call in list(self.calls):
            entry = _fabric_entry(call)
            out.append(entry)
            covered.setdefault(entry.group, []).append((entry.seq, entry.last_seq))
        if recording is not None:
            ranks_of = {e.group: e.group_ranks for e in out}
            for record in recording.entries:
                if record.pg_id in self.ignore_groups:
                    continue
                spans = covered.get(record.pg_id, ())
                if any(low <= record.seq <= high for low, high in spans):
                    continue
                finished = record.finished
                out.append(LedgerEntry(
                    seq=record.seq, last_seq=record.seq, op=record.op, group=record.pg_id,
                    group_ranks=ranks_of.get(record.pg_id, _world_ranks() if record.pg_id == "0" else ()),
                    shapes=record.input_sizes, dtypes=tuple(_torch_dtype(d) for d in record.input_dtypes),
                    reduce_op=None, src=None, name=None, state="finished" if finished else "issued",
                    origin="torch", place=None, started_ns=record.created_ns,
                ))  # fmt: skip
        out.sort(key=lambda e: (int(e.group) if e.group.isdigit() else 10**9, e.seq, e.origin != "fabric"))
        return out

    def open_call(self) -> Optional[_Call]:
        """The innermost Fabric collective not yet returned (calls end in order), else ``None``."""
        calls = self.calls
        try:
            call = calls[-1]
        except IndexError:
            return None
        return None if call.ended_ns else call

    def progress(self) -> Tuple[int, int]:
        """Cheap: (Fabric calls recorded, torch's collective count on the world group)."""
        return self.count, _group_seq(None, 0) or 0

    def current(self, frame: Optional[FrameType] = None,
                recording: Optional["flight_recorder.Recording"] = None) -> Optional[LedgerEntry]:
        """The collective this rank waits in now, if any: the innermost open Fabric call, else the
        newest unfinished one torch issued itself. ``frame`` (the waiting thread's current frame)
        gives a torch-internal one its place in the user's code and who issued it."""
        call = self.open_call()
        if call is not None:
            return _fabric_entry(call)
        if recording is None:
            recording = flight_recorder.read()
        waiting = [r for r in recording.waiting() if r.pg_id not in self.ignore_groups] if recording is not None else []
        if not waiting:
            return None
        record = max(waiting, key=lambda r: r.created_ns)
        files = _stack_files(frame)
        return LedgerEntry(
            seq=record.seq, last_seq=record.seq, op=record.op, group=record.pg_id,
            group_ranks=_world_ranks() if record.pg_id == "0" else (), shapes=record.input_sizes,
            dtypes=tuple(_torch_dtype(d) for d in record.input_dtypes), reduce_op=None, src=None, name=None,
            state="issued", origin="torch", place=place_of(frame), started_ns=record.created_ns,
            via=issuer(record.op, files), **_source_of(place_of(frame)),
        )  # fmt: skip


class LedgerTracer:
    """The tracer that writes the ledger, then hands over to ``inner`` with ``meta["seq"]`` set."""

    def __init__(self, ledger: Ledger, inner: Optional[Tracer] = None) -> None:
        self.ledger = ledger
        self.inner = inner

    def enter(self, op: str, meta: dict) -> Any:
        call = self.ledger.begin(op, meta)  # sets meta["seq"] for the links after it
        inner = self.inner
        return call if inner is None else (call, inner.enter(op, meta))  # the token: the call, or both

    def exit(self, token: Any, error: Optional[BaseException]) -> None:
        if self.inner is None:
            self.ledger.end(token, error)
            return
        call, inner = token
        self.ledger.end(call, error)
        self.inner.exit(inner, error)


_LEDGER: Optional[Ledger] = None


def process_ledger() -> Ledger:
    """This process's ledger (created on first use)."""
    global _LEDGER
    if _LEDGER is None:
        _LEDGER = Ledger()
    return _LEDGER


def with_live_entry(entries: Tuple[LedgerEntry, ...], waiting: Optional[LedgerEntry]) -> Tuple[LedgerEntry, ...]:
    """``entries`` with the entry a rank waits in replaced by the live one (which knows its place)."""
    if waiting is None:
        return entries
    return tuple(waiting if (e.group, e.seq) == (waiting.group, waiting.seq) else e for e in entries)


def issuer(op: str, files: List[str]) -> Optional[str]:
    """Who issued a torch-internal collective, judged by the files on the waiting thread's stack."""
    joined = "\n".join(files)
    noun = op.replace("_", "-")
    if "/fsdp/" in joined or "_composable/fsdp" in joined:
        return f"FSDP's {noun}"
    if "/deepspeed/" in joined:
        return f"DeepSpeed's {noun}"
    if "torch/autograd/" in joined or "torch/_tensor.py" in joined:
        return "DDP's gradient all-reduce" if op == "all_reduce" else f"{noun} during backward"
    if "torch/nn/parallel/distributed.py" in joined:
        return f"DDP's {noun}"
    return None


def _stack_files(frame: Optional[FrameType]) -> List[str]:
    files = []
    while frame is not None:
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return files


# -- helpers --------------------------------------------------------------------------------------
def _group_object(group: Any) -> Any:
    return group if group is not None else _dist.group.WORLD  # None before init_process_group


def _group_seq(group: Any, default: Optional[int]) -> Optional[int]:
    pg = group if group is not None else _dist.group.WORLD  # _group_object, inlined: every collective calls this
    try:
        return pg._get_sequence_number_for_group()  # an int already
    except Exception:  # noqa: BLE001 - no process group, or a backend without sequence numbers
        return default


def _group_id(group: Any) -> str:
    pg = _group_object(group)
    name = getattr(pg, "group_name", None)
    return str(name) if name is not None else "0"


def _group_ranks(group: Any) -> Tuple[int, ...]:
    import torch.distributed as dist

    try:
        return tuple(dist.get_process_group_ranks(_group_object(group)))
    except Exception:  # noqa: BLE001
        return ()


def _world_ranks() -> Tuple[int, ...]:
    import torch.distributed as dist

    return tuple(range(dist.get_world_size())) if dist.is_initialized() else ()


def _fabric_entry(call: _Call) -> LedgerEntry:
    meta = call.meta
    state = "failed" if call.error else ("finished" if call.ended_ns else "issued")
    return LedgerEntry(
        seq=call.seq, last_seq=call.last_seq, op=call.op, group=_group_id(call.group),
        group_ranks=_group_ranks(call.group),
        shapes=tuple(tuple(int(d) for d in s) for s in meta.get("shapes") or ()),
        dtypes=tuple(str(d).replace("torch.", "") for d in meta.get("dtypes") or ()),
        reduce_op=meta.get("reduce_op"), src=meta.get("src"), name=meta.get("name"),
        state=state, origin="fabric", place=call.place, started_ns=call.started_ns, **_source_of(call.place),
    )  # fmt: skip


def _source_of(place: Optional[Place]) -> Dict[str, Any]:
    if place is None:
        return {}
    return {"code": source_line(place), "guard": rank_zero_guard(place)}


_DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16", "BFloat16": "bfloat16", "Long": "int64",
           "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool"}


def _torch_dtype(name: str) -> str:
    return _DTYPES.get(name, name.lower())


def _short_dtype(name: str) -> str:
    return str(name).replace("torch.", "")
