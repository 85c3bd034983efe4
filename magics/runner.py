"""In the notebook: run one task on the pool and keep every rank's failure, not only the first.

``RankPool.run`` raises the first group of identical failures; the magic shows *every* rank's
traceback (and, after an interrupt, where each rank was), so it asks the pool for the whole
:class:`~notebook_fabric.launching.outcome.RunOutcome` (``RankPool.run_task``: the same run loop, with
the same policy on failures, deaths, timeouts and interrupts) and renders that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from notebook_fabric.launching.pool import RankPool
from notebook_fabric.live.events import RemoteFailure
from notebook_fabric.live.sinks import EventSink

FAILURE_GRACE = 1.0  # seconds to collect the other ranks' failures after the first
INTERRUPT_GRACE = 3.0  # seconds ranks get to stop after an interrupt before the pool is ended


@dataclass
class RunRecord:
    """Per rank: the failures (with tracebacks) of the last run, who was interrupted, who died."""

    failures: Dict[int, RemoteFailure] = field(default_factory=dict)
    arrival: List[int] = field(default_factory=list)
    interrupted: List[int] = field(default_factory=list)
    finished: List[int] = field(default_factory=list)
    deaths: Dict[int, str] = field(default_factory=dict)


def run_on_pool(pool: RankPool, task: Any, ranks: Optional[Sequence[int]], sink: EventSink,
                timeout: Optional[float], record: RunRecord) -> Dict[int, Any]:
    """``{rank: value}`` of ``task`` on ``ranks`` (all if ``None``); fills ``record`` either way.

    Raises what ``pool.run`` raises (the rank's exception, ``RankDiedError``,
    ``LaunchTimeoutError``, ``KeyboardInterrupt``, ``PoolClosedError``).
    """
    outcome = pool.run_task(task, ranks, timeout=timeout, sink=sink, recover=True, failure_grace=FAILURE_GRACE,
                            interrupt_grace=INTERRUPT_GRACE)
    record.failures, record.arrival = dict(outcome.failures), list(outcome.arrival)
    record.interrupted, record.finished = list(outcome.interrupted), outcome.finished
    record.deaths = dict(outcome.deaths)
    return outcome.result()
