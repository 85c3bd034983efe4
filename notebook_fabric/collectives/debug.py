"""Debug mode (``Fabric(debug=True)``, ``%%fabric --debug``): ranks compare each collective before running it.

A mismatched collective (another op, shape, dtype, reduce op or source, or ranks out of step) would
hang or fail with an opaque backend error. With the checker installed, every rank first shares a
fingerprint of its call (sequence number and a checksum of op, shapes, dtypes, reduce op, source);
only when the fingerprints differ do the ranks exchange the full calls and where in your code they
come from, and every rank raises the same :class:`CollectiveMismatchError` naming each rank's call,
so nothing waits forever.

The fingerprints travel over a socket mesh between the ranks when they share a host
(:mod:`.check_mesh`, ~15 us), else as one gloo all-gather of two integers on a group of its own.
Ranks that do not talk through torch.distributed (XLA's) say how their fingerprints travel with
:func:`provide_check_channel` before the checks are enabled. A barrier on the world is checked by torch's own ``monitored_barrier`` instead (gloo): a rank that
does not arrive within ``NOTEBOOK_FABRIC_DEBUG_BARRIER_TIMEOUT`` seconds (default 60) is named by
torch, and that finding is raised in the ranks as :class:`BarrierMissedError`, so it reaches the
notebook with the barrier's place, not only a rank's stderr.
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..live.ranks import format_ranks
from .callsite import Place, source_line, user_place
from .check_mesh import CheckMesh, MeshPeerGone, build_mesh
from .ops import _all_gather_single
from .trace import Tracer, get_tracer, rank_state, set_tracer


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
    host: str = ""  # the rank's host, where ranks run on other hosts (NOTEBOOK_FABRIC_HOST)

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


_FINGERPRINT = struct.Struct("<qq")
BARRIER_TIMEOUT_VARIABLE = "NOTEBOOK_FABRIC_DEBUG_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT = 60.0


class BarrierMissedError(CollectiveMismatchError):
    """Raised in debug mode when torch's ``monitored_barrier`` found ranks missing from a barrier;
    ``missing`` holds their global ranks (empty when torch's text named none)."""

    def __init__(self, message: str, missing: Optional[List[int]] = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])

    def __reduce__(self) -> Any:  # it travels from the rank to the notebook
        return type(self), (str(self), self.missing)


class SignatureChecker:
    """A tracer that checks every collective across the group, then hands over to the tracer it wraps.

    The check of a world collective is one exchange of 16 bytes per rank (sequence number and a
    checksum of the signature) over ``mesh`` when there is one, else one small all-gather on
    ``check_group`` (a group of its own, so the ledger's numbering of the world's collectives stays
    that of the program); only when they differ do the ranks exchange their full signatures to say
    what differs. Nothing else runs per call: the place in your code is looked up only then.
    """

    def __init__(self, inner: Optional[Tracer] = None, check_group: Any = None, mesh: Optional[CheckMesh] = None,
                 barrier_timeout: Optional[float] = None) -> None:
        self.inner = inner
        self.check_group = check_group
        self.mesh = mesh
        self.barrier_timeout = barrier_timeout
        self._seq = 0
        self._checksums: Dict[tuple, int] = {}

    def enter(self, op: str, meta: dict) -> Any:
        self._seq += 1
        if self.mesh is not None or dist.is_initialized():
            self._check(op, meta)
        return self.inner.enter(op, meta) if self.inner is not None else None

    def exit(self, token: Any, error: Optional[BaseException]) -> None:
        if self.inner is not None:
            self.inner.exit(token, error)

    def _check(self, op: str, meta: dict) -> None:
        group = meta.get("group")
        world = group is None or group is dist.group.WORLD
        if world and op == "barrier" and self.barrier_timeout and self.check_group is not None:
            self._monitored_barrier(meta)
            return
        key = (op, tuple(map(tuple, meta.get("shapes", ()))), tuple(meta.get("dtypes", ())),
               meta.get("reduce_op"), meta.get("src"))  # fmt: skip
        checksum = self._checksums.get(key)
        if checksum is None:
            if len(self._checksums) > 4096:  # many distinct shapes (variable lengths): start over
                self._checksums.clear()
            checksum = self._checksums[key] = zlib.crc32(repr(key).encode())
        if world and self.mesh is not None:
            frame = _FINGERPRINT.pack(self._seq, checksum)
            try:
                if all(other == frame for other in self.mesh.exchange(frame)):
                    return
                everyone = self.mesh.exchange_objects(self._signature(op, meta))
            except MeshPeerGone as gone:
                raise CollectiveMismatchError(
                    f"{self._signature(op, meta).describe()}: {gone}, so this collective could never complete."
                ) from None
            ranks = list(range(len(everyone)))
        else:
            via = self.check_group if world and self.check_group is not None else group
            size = dist.get_world_size(via)
            code = torch.tensor([self._seq, checksum], dtype=torch.int64)
            gathered = code.new_empty(2 * size)
            _all_gather_single(gathered, code, group=via)
            if bool((gathered.view(size, 2) == code).all()):
                return
            everyone = [None] * size
            dist.all_gather_object(everyone, self._signature(op, meta), group=via)
            ranks = [dist.get_global_rank(via, i) if via is not None else i for i in range(len(everyone))]
        lines = [f"  rank {rank}{f' on host {signature.host}' if signature.host else ''}: {signature.describe()}"
                 for rank, signature in zip(ranks, everyone)]
        raise CollectiveMismatchError(
            "The ranks called different collectives (debug mode stopped them before they could hang):\n"
            + "\n".join(lines)
            + "\nEvery rank must make the same collective calls, in the same order, with the same shapes and dtypes."
        )

    def _signature(self, op: str, meta: dict) -> CallSignature:
        """The full signature of this rank's call, with its place (built only to explain a mismatch)."""
        return CallSignature(
            seq=self._seq, op=op, shapes=tuple(tuple(s) for s in meta.get("shapes", ())),
            dtypes=tuple(meta.get("dtypes", ())), reduce_op=meta.get("reduce_op"), src=meta.get("src"),
            name=meta.get("name"), place=_format_place(user_place(4)), host=os.environ.get("NOTEBOOK_FABRIC_HOST", ""),
        )  # fmt: skip

    def _monitored_barrier(self, meta: dict) -> None:
        """torch's ``monitored_barrier`` on the check group: a rank that does not come is named by torch."""
        try:
            dist.monitored_barrier(group=self.check_group, timeout=timedelta(seconds=self.barrier_timeout),
                                   wait_all_ranks=True)
        except RuntimeError as error:
            name = meta.get("name")
            label = f"barrier #{self._seq}" + (f" (name={name!r})" if name else "")
            finding = " ".join(str(error).split()).split(" Original exception:")[0] or type(error).__name__
            missing = self._missing_ranks(finding)
            who = (f"{format_ranks(missing)} did not arrive" if missing else "not every rank arrived")
            raise BarrierMissedError(
                f"{label} at {_format_place(user_place(4))}: {who} (debug mode waits up to {self.barrier_timeout:g} s, "
                f"{BARRIER_TIMEOUT_VARIABLE}). torch's monitored_barrier reported: {finding}\n"
                "Every rank must call the barrier (and every collective), in the same order.",
                missing=missing,
            ) from None

    def _missing_ranks(self, finding: str) -> List[int]:
        """The global ranks torch's monitored_barrier names as missing (group ranks in its text)."""
        found = _MISSING.search(finding)
        if found:
            local = [int(r) for r in re.findall(r"\d+", found.group(1))]
        elif _MONITOR_MISSING.search(finding):
            local = [0]  # the monitoring rank (the group's rank 0) never answered
        else:
            return []
        return sorted(dist.get_global_rank(self.check_group, r) for r in local)


_MISSING = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")
_MONITOR_MISSING = re.compile(r"waiting for send/recv from rank 0")


def enable_signature_checks() -> SignatureChecker:
    """Wrap this process's tracer (if any) in a :class:`SignatureChecker`; idempotent.

    Every rank calls it at the same point (it builds a process group and the socket mesh)."""
    current = get_tracer()
    if isinstance(current, SignatureChecker):
        return current
    channel = rank_state().get(_CHANNEL)
    if channel is not None:  # this rank's peers are not reached through torch.distributed
        checker = SignatureChecker(current, None, channel(), barrier_timeout=None)
        set_tracer(checker)
        return checker
    group = _check_group()
    mesh = build_mesh(group) if group is not None else None
    checker = SignatureChecker(current, group, mesh, barrier_timeout=_barrier_timeout())
    set_tracer(checker)
    return checker


_CHANNEL = "debug.check_channel"


def provide_check_channel(factory: Callable[[], Any]) -> None:
    """For ranks that do not talk through torch.distributed (XLA): ``factory()`` returns this rank's
    channel to its peers, with :class:`~.check_mesh.CheckMesh`'s ``exchange(frame)`` and
    ``exchange_objects(obj)`` (raising :class:`~.check_mesh.MeshPeerGone` for a peer that ended).
    Call it before :func:`enable_signature_checks`; it is built only if debug mode is on."""
    rank_state()[_CHANNEL] = factory


def _barrier_timeout() -> Optional[float]:
    """Seconds a debug-mode barrier waits before torch names the missing ranks (0: a plain barrier)."""
    text = os.environ.get(BARRIER_TIMEOUT_VARIABLE, "")
    try:
        value = float(text) if text else DEFAULT_BARRIER_TIMEOUT
    except ValueError:
        value = DEFAULT_BARRIER_TIMEOUT
    return value if value > 0 else None


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
