"""Inside a rank: refuse collectives that would hang because the cell runs on a subset of ranks.

``%%fabric --ranks 0`` runs a cell on rank 0 only; the other ranks sit idle in their task loop.
A collective over the whole process group (``fabric.all_reduce``, ``fabric.barrier``,
``torch.distributed.all_reduce`` with the default group, ...) would then wait forever for ranks
that are not running the cell. While such a cell runs, this guard

- wraps the rank's collective tracer (``notebook_fabric.collectives.trace``), so every collective
  of the collective layer (all of ``fabric.*``) is refused before it starts, and
- wraps the collectives of ``torch.distributed`` itself, so direct calls are refused too unless
  their ``group`` holds only ranks that run the cell.

Both raise :class:`SubsetCollectiveError` in the ranks, naming the ranks that are not taking
part. Collectives torch issues in C++ (DDP's gradient all-reduce in ``backward``) cannot be refused
before they start; the ledger sees them (Flight Recorder) and the notebook's run loop reports such a
wait at once as a certain hang (``notebook_fabric.launching.hang``), naming the idle ranks.

It is the outermost link of the tracer chain (see :mod:`.trace`).
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from notebook_fabric.live.ranks import format_ranks

_DIST_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_gather_single",
    "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter",
    "scatter_object_list", "all_reduce_coalesced", "new_group",
)

_SIGNATURES: Dict[Callable[..., Any], Optional[inspect.Signature]] = {}


class SubsetCollectiveError(RuntimeError):
    """A collective was called in a cell that runs on only some of the ranks."""


def subset_message(op: str, running: Sequence[int], needed: Sequence[int], world_size: int) -> str:
    """The error text: which collective, who runs the cell, who would be waited for, what to do."""
    missing = sorted(set(needed) - set(running))
    return (
        f"{op} needs {format_ranks(needed) if len(needed) < world_size else f'all {world_size} ranks'}, "
        f"but this cell runs only on {format_ranks(running)} (--ranks): {format_ranks(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not running it, so the collective would wait forever. "
        "Run the cell on every rank (drop --ranks), or keep collectives out of --ranks cells."
    )


class _GuardTracer:
    """A collective tracer that refuses world-wide collectives, then defers to the rank's tracer."""

    def __init__(self, inner: Any, running: Sequence[int], world_size: int) -> None:
        self.inner = inner
        self.running = list(running)
        self.world_size = world_size

    def enter(self, op: str, meta: dict) -> Any:
        group_size = (meta or {}).get("group_size")
        if group_size is None or group_size >= self.world_size:
            raise SubsetCollectiveError(subset_message(op, self.running, range(self.world_size), self.world_size))
        return self.inner.enter(op, meta) if self.inner is not None else None

    def exit(self, token: Any, error: Optional[BaseException]) -> None:
        if self.inner is not None:
            self.inner.exit(token, error)


def _group_of(function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if function not in _SIGNATURES:
        try:
            _SIGNATURES[function] = inspect.signature(function)
        except (TypeError, ValueError):
            _SIGNATURES[function] = None
    signature = _SIGNATURES[function]
    if signature is None:
        return kwargs.get("group")
    try:
        return signature.bind_partial(*args, **kwargs).arguments.get("group")
    except TypeError:
        return kwargs.get("group")


def _guarded(name: str, function: Callable[..., Any], running: Sequence[int], world_size: int) -> Callable[..., Any]:
    import torch.distributed as dist

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if name == "new_group":  # creating a group is itself a collective over every rank
            needed: List[int] = list(range(world_size))
        else:
            group = _group_of(function, args, kwargs)
            world = getattr(dist.group, "WORLD", None)
            needed = list(range(world_size)) if group is None or group is world else dist.get_process_group_ranks(group)
        if not set(needed) <= set(running):
            raise SubsetCollectiveError(subset_message(f"torch.distributed.{name}", running, needed, world_size))
        return function(*args, **kwargs)

    wrapper.__notebook_fabric_guard__ = True  # type: ignore[attr-defined]
    return wrapper


@contextmanager
def subset_guard(running: Sequence[int], world_size: int) -> Iterator[None]:
    """Refuse collectives that need ranks outside ``running`` while the block runs (see module doc)."""
    import torch.distributed as dist

    from notebook_fabric.collectives.trace import get_tracer, set_tracer

    previous = get_tracer()
    guard = _GuardTracer(previous, running, world_size)
    set_tracer(guard)
    originals = {}
    for name in _DIST_COLLECTIVES:
        function = getattr(dist, name, None)
        if callable(function) and not getattr(function, "__notebook_fabric_guard__", False):
            originals[name] = function
            setattr(dist, name, _guarded(name, function, running, world_size))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
        if get_tracer() is guard:
            set_tracer(previous)
