"""Debug mode (``Fabric(debug=True)``, ``%%fabric --debug``): ranks compare each collective before running it.

A mismatched collective (another op, shape, dtype, reduce op or source, or ranks out of step) would
hang or fail with an opaque backend error. With the checker installed, every rank first shares its
call's signature and the place in your code it comes from; on any difference, every rank raises the
same :class:`CollectiveMismatchError` naming each rank's call, so nothing waits forever.

It costs one small ``all_gather_object`` per collective: a tool for finding a bug, not for training.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from .trace import Tracer, get_tracer, set_tracer

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules["notebook_fabric"], sys.modules["torch"])
    if getattr(module, "__file__", None)
) + (contextlib.__file__,)


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
    """A tracer that checks every collective across the group, then hands over to the tracer it wraps."""

    def __init__(self, inner: Optional[Tracer] = None) -> None:
        self.inner = inner
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
            name=meta.get("name"), place=_call_site(),
        )  # fmt: skip
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        if all(mine.matches(other) for other in everyone):
            return
        ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(len(everyone))]
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
    checker = SignatureChecker(current)
    set_tracer(checker)
    return checker


def _call_site() -> str:
    """``file:line in function`` of the innermost frame outside notebook-fabric, torch and contextlib."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
