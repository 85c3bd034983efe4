"""Debug mode (``Fabric(debug=True)``, ``%%fabric --debug``): ranks compare each collective before running it.

A mismatched collective (another op, shape, dtype, reduce op or source, or ranks out of step) would
hang or fail with an opaque backend error. With the checker installed, every rank first shares its
call's signature and the place in your code it comes from; on any difference, every rank raises the
same :class:`CollectiveMismatchError` naming each rank's call, so nothing waits forever.

It costs one all-gather of two integers per collective: a tool for finding a bug, not for training.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .callsite import Place, source_line, user_place
from .ops import _all_gather_single
from .trace import Tracer, get_tracer, set_tracer


class CollectiveMismatchError(RuntimeError):
    """Raised on every rank when the ranks' next collective calls do not match (debug mode)."""


@dataclass(frozen=True)
class CallSignature:
    """What one rank is about to call, and from where."""

    seq: int
    op: str
    shapes: tuple
    dtypes: tuple
    reduce_op: Optional[str]
    src: Optional[int]
    name: Optional[str]
    place: str

    def matches(self, other: "CallSignature") -> bool:
        mine = (self.seq, self.op, self.shapes, self.dtypes, self.reduce_op, self.src)
        return mine == (other.seq, other.op, other.shapes, other.dtypes, other.reduce_op, other.src)

    def checksum(self) -> int:
        """A checksum of what must match across ranks (the same in every process, unlike ``hash``)."""
        key = (self.op, self.shapes, self.dtypes, self.reduce_op, self.src)
        return zlib.crc32(repr(key).encode())

    def describe(self) -> str:
        tensors = ", ".join(f"{dtype.replace('torch.', '')}{list(shape)}" for shape, dtype in zip(self.shapes, self.dtypes))
        parts = [f"#{self.seq} {self.op}({tensors or 'object'})"]
        if self.reduce_op is not None:
            parts.append(f"reduce_op={self.reduce_op}")
        if self.src is not None:
            parts.append(f"src={self.src}")
        if self.name is not None:
            parts.append(f"name={self.name!r}")
        return " ".join(parts) + f"  at {self.place}"


class SignatureChecker:
    """A tracer that checks every collective across the group, then hands over to the tracer it wraps.

    The check is one small all-gather of two integers per rank (sequence number and a checksum of
    the signature), on a process group of its own when the call is on the world (so the ledger's
    numbering of the world's collectives stays that of the program); only when they differ do the
    ranks exchange their full signatures to say what differs.
    """

    def __init__(self, inner: Optional[Tracer] = None, check_group: Any = None) -> None:
        self.inner = inner
        self.check_group = check_group
        self._seq = 0

    def enter(self, op: str, meta: dict) -> Any:
        self._seq += 1
        if dist.is_available() and dist.is_initialized():
            self._check(op, meta)
        return self.inner.enter(op, meta) if self.inner is not None else None

    def exit(self, token: Any, error: Optional[BaseException]) -> None:
        if self.inner is not None:
            self.inner.exit(token, error)

    def _check(self, op: str, meta: dict) -> None:
        group = meta.get("group")
        mine = CallSignature(
            seq=self._seq, op=op, shapes=tuple(tuple(s) for s in meta.get("shapes", ())),
            dtypes=tuple(meta.get("dtypes", ())), reduce_op=meta.get("reduce_op"), src=meta.get("src"),
            name=meta.get("name"), place=_format_place(user_place(3)),
        )  # fmt: skip
        via = self.check_group if (group is None or group is dist.group.WORLD) and self.check_group is not None else group
        size = dist.get_world_size(via)
        code = torch.tensor([mine.seq, mine.checksum()], dtype=torch.int64)
        gathered = code.new_empty(2 * size)
        _all_gather_single(gathered, code, group=via)
        if bool((gathered.view(size, 2) == code).all()):
            return
        everyone: list = [None] * size
        dist.all_gather_object(everyone, mine, group=via)
        ranks = [dist.get_global_rank(via, i) if via is not None else i for i in range(len(everyone))]
        lines = [f"  rank {rank}: {signature.describe()}" for rank, signature in zip(ranks, everyone)]
        raise CollectiveMismatchError(
            "The ranks called different collectives (debug mode stopped them before they could hang):\n"
            + "\n".join(lines)
            + "\nEvery rank must make the same collective calls, in the same order, with the same shapes and dtypes."
        )


def enable_signature_checks() -> SignatureChecker:
    """Wrap this process's tracer (if any) in a :class:`SignatureChecker`; idempotent."""
    current = get_tracer()
    if isinstance(current, SignatureChecker):
        return current
    checker = SignatureChecker(current, _check_group())
    set_tracer(checker)
    return checker


def _check_group() -> Any:
    """A gloo group over every rank for the checks (created by every rank: this runs in ``launch``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        group = dist.new_group(backend="gloo")
    except Exception:  # noqa: BLE001 - no second group: check on the call's own group
        return None
    from .ledger import process_ledger

    process_ledger().ignore_groups.add(str(getattr(group, "group_name", "")))
    return group


def _format_place(place: Optional[Place]) -> str:
    """``file:line in function: source`` (cells show as ``<fabric-cell-N>:line``)."""
    if place is None:
        return "<unknown>"
    code = source_line(place)
    return f"{place[0]}:{place[1]} in {place[2]}" + (f": {code}" if code else "")
