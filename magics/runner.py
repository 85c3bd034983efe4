"""In the notebook: run one task on the pool and keep every rank's failure, not only the first.

``RankPool.run`` raises the first group of identical failures; the magic shows *every* rank's
traceback (and, after an interrupt, where each rank was), so it drives the pool's own
:class:`~notebook_fabric.launch.run_loop.RunLoop` (the same code ``pool.run`` uses, with the same
policy on failures, deaths, timeouts and interrupts) and reads its per-rank record afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from notebook_fabric.launch.pool import RankPool
from notebook_fabric.live.events import RemoteFailure
from notebook_fabric.live.sinks import EventSink

FAILURE_GRACE = 1.0  # seconds to collect the other ranks' failures after the first
INTERRUPT_GRACE = 3.0  # seconds ranks get to stop after an interrupt before the pool is ended


@dataclass
class RunRecord:
    """Per rank: the failures (with tracebacks) of the last run, and who was interrupted."""

    failures: Dict[int, RemoteFailure] = field(default_factory=dict)
    arrival: List[int] = field(default_factory=list)
    interrupted: List[int] = field(default_factory=list)
    finished: List[int] = field(default_factory=list)


def run_on_pool(pool: RankPool, task: Any, ranks: Optional[Sequence[int]], sink: EventSink,
                timeout: Optional[float], record: RunRecord) -> Dict[int, Any]:
    """``{rank: value}`` of ``task`` on ``ranks`` (all if ``None``); fills ``record`` either way.

    Raises what ``pool.run`` raises (the rank's exception, ``RankDiedError``,
    ``LaunchTimeoutError``, ``KeyboardInterrupt``, ``PoolClosedError``).
    """
    try:
        from notebook_fabric.launch.run_loop import RunLoop
    except ImportError:  # pragma: no cover - the pool's internals moved: per-rank detail is lost
        return pool.run(task, ranks, timeout=timeout, sink=sink, failure_grace=FAILURE_GRACE,
                        interrupt_grace=INTERRUPT_GRACE)
    selected = list(range(pool.world_size)) if ranks is None else sorted(ranks)
    loop = RunLoop(pool, selected, sink, timeout=timeout, recover=True, failure_grace=FAILURE_GRACE,
                   interrupt_grace=INTERRUPT_GRACE)
    try:
        return loop.run(task)
    finally:
        record.failures = dict(getattr(loop, "failures", {}))
        record.arrival = list(getattr(loop, "arrival", []))
        record.interrupted = list(getattr(loop, "interrupted", []))
        record.finished = sorted(getattr(loop, "results", {}))
