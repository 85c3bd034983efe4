"""Inside a rank: the collective ledger's place in the rank's life.

Before the Fabric is built, the Flight Recorder is switched on (it must be set before the process
group exists) and the tracer chain gets its ledger link (see :mod:`notebook_fabric.collectives.trace`).
After each task, the ledger's newest entries go to the notebook when the task issued collectives, so
they survive the rank (``launch(fn)`` ranks exit right after their result).
"""
from __future__ import annotations

import time
from typing import Any, Optional

from ...live.events import LedgerSnapshot
from .control import RankState

SNAPSHOT_ENTRIES = 500


def install_ledger(state: RankState, tracer: Any = None) -> Any:
    """Switch the Flight Recorder on and install ``LedgerTracer(ledger, tracer)``; returns the ledger.

    ``tracer`` is the event link (``control.CollectiveTracer``), only where the notebook wants
    enter/exit events: the heartbeat reads the ledger's open call (``state.collective``), so a
    collective is recorded once."""
    from ...collectives import flight_recorder
    from ...collectives.ledger import LedgerTracer, process_ledger
    from ...collectives.trace import set_tracer

    flight_recorder.enable()
    ledger = process_ledger()
    set_tracer(LedgerTracer(ledger, tracer))
    state.ledger = ledger
    return ledger


def ledger_snapshot(state: RankState, task_id: int) -> Optional[LedgerSnapshot]:
    """The ledger's newest entries as an event, or ``None`` when nothing was issued since the last one."""
    ledger = state.ledger
    if ledger is None:
        return None
    from ...collectives import flight_recorder

    recording = flight_recorder.read()
    for _ in range(10):  # the backend counts a finished collective a moment after the wait returned
        if recording is None or not recording.waiting():
            break
        time.sleep(0.005)
        recording = flight_recorder.read()
    mark = (ledger.count, tuple(sorted(recording.enqueued.items())) if recording is not None else ())
    if mark == getattr(state, "ledger_mark", None):
        return None
    state.ledger_mark = mark
    try:
        entries = ledger.entries(recording)
    except Exception:  # noqa: BLE001 - a diagnostic must never fail a task
        return None
    return LedgerSnapshot(rank=state.rank, time=time.time(), task_id=task_id,
                          entries=tuple(entries[-SNAPSHOT_ENTRIES:]))
