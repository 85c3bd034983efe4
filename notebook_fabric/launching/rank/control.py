"""Inside a rank: the side threads that keep the notebook informed while the main thread works.

- the control thread reads the connection: tasks and stop go to the main thread's inbox,
  ``where`` requests are answered at once from ``sys._current_frames()`` (so they work while a
  task is stuck in a collective), and a closed connection (the notebook is gone) ends the rank;
  between messages it sends heartbeats (memory, current collective) every few seconds;
- the collective the rank is in is the ledger's open call (``notebook_fabric.collectives.ledger``,
  the one record per call); :class:`CollectiveTracer` joins the tracer chain, after the ledger,
  only where the notebook asked for enter/exit events (the dashboard).
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Optional, Tuple

from ...live.events import CollectiveEntered, CollectiveExited, CollectiveState, Heartbeat, WhereReply
from ..processes import kill_own_children
from ..protocol import WhereRequest
from ...stepping.messages import InputReply
from ...stepping.rank_prompts import deliver
from ..frames import LAUNCH_DIR
from .output import Outbox



class RankState:
    """What the side threads need to know about the main thread."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.main_thread_id = threading.main_thread().ident
        self.in_task = False
        self.rss_bytes = 0  # resident memory, kept fresh by the rank's memory sampler (telemetry.py)
        self.ledger: Any = None  # the rank's collectives.ledger.Ledger, once installed

    @property
    def collective(self) -> Optional[CollectiveState]:
        """The innermost collective the main thread is in: the ledger's open call."""
        call = self.ledger.open_call() if self.ledger is not None else None
        if call is None:
            return None
        return CollectiveState(seq=call.seq, op=call.op, meta=_plain_meta(call.meta), entered_at=call.started_ns / 1e9)


class CollectiveTracer:
    """The rank's ``notebook_fabric.collectives.trace`` link that sends every collective's enter and
    exit to the notebook as events; it follows the ledger's link, which numbers the call."""

    def __init__(self, state: RankState, outbox: Outbox) -> None:
        self._state = state
        self._outbox = outbox

    def enter(self, op: str, meta: dict) -> CollectiveState:
        entry = CollectiveState(seq=meta["seq"], op=op, meta=_plain_meta(meta), entered_at=time.time())
        self._outbox.put(CollectiveEntered(rank=self._state.rank, time=entry.entered_at, state=entry))
        return entry

    def exit(self, token: CollectiveState, error: Optional[BaseException]) -> None:
        self._outbox.put(CollectiveExited(rank=self._state.rank, time=time.time(), seq=token.seq,
                                          error=None if error is None else f"{type(error).__name__}: {error}"))


def start_control_thread(connection: Connection, inbox: "queue.SimpleQueue[Any]", outbox: Outbox,
                         state: RankState, heartbeat_interval: float) -> threading.Thread:
    """Read the connection until it closes (then end the rank and its children at once); answer
    ``where`` requests; send a :class:`Heartbeat` every ``heartbeat_interval`` seconds."""
    def beat() -> None:  # resident memory as the rank's memory sampler last read it
        collective, _ = live_collective(state, heartbeat=True)
        outbox.put(Heartbeat(rank=state.rank, time=time.time(), rss_bytes=state.rss_bytes, in_task=state.in_task,
                             collective=collective))

    def control() -> None:
        next_beat = time.monotonic() + heartbeat_interval
        while True:
            now = time.monotonic()
            if now >= next_beat:
                try:
                    beat()
                except Exception:  # noqa: BLE001 - a missed beat is better than a dead control thread
                    pass
                next_beat = now + heartbeat_interval
            try:
                if not connection.poll(max(0.0, next_beat - now)):
                    continue
                message = connection.recv()
            except (EOFError, OSError):
                kill_own_children()
                os._exit(70)
            if isinstance(message, WhereRequest):
                collective, waiting = live_collective(state)
                entries = ledger_entries(state) if getattr(message, "ledger", False) else None
                outbox.put(WhereReply(rank=state.rank, time=time.time(), request_id=message.request_id,
                                      stack=main_thread_stack(state), in_task=state.in_task,
                                      collective=collective, waiting=waiting, ledger=entries))
            elif isinstance(message, InputReply):  # the main thread waits at a prompt, not in the inbox
                deliver(message)
            else:
                inbox.put(message)

    thread = threading.Thread(target=control, name="notebook-fabric control", daemon=True)
    thread.start()
    return thread


def live_collective(state: RankState, heartbeat: bool = False) -> Tuple[Optional[CollectiveState], Any]:
    """The collective the main thread waits in, Fabric's or torch's own (from the ledger), as the
    heartbeat's :class:`CollectiveState` and the ledger's entry.

    For a ``heartbeat`` the Flight Recorder is read only when the rank's torch collective count did
    not move since the last beat (a training loop that makes progress pays nothing)."""
    if state.ledger is None or not state.in_task:
        return state.collective, None
    if heartbeat and state.collective is None:
        count = state.ledger.progress()
        moved, state.beat_progress = count != getattr(state, "beat_progress", None), count
        if moved:
            return None, None
    try:
        entry = state.ledger.current(sys._current_frames().get(state.main_thread_id))
    except Exception:  # noqa: BLE001 - a report must not kill the control thread
        return state.collective, None
    if entry is None:
        return state.collective, entry
    from ...collectives.callsite import describe_place

    place = describe_place(entry.place) if entry.place is not None else None
    traced = state.collective
    if entry.origin == "fabric" and traced is not None:
        return CollectiveState(seq=traced.seq, op=traced.op, meta={**traced.meta, "place": place},
                               entered_at=traced.entered_at), entry
    meta = {"shapes": entry.shapes, "dtypes": entry.dtypes, "via": entry.via, "origin": entry.origin, "place": place,
            "detail": entry.bucket() or None}
    return CollectiveState(seq=entry.seq, op=entry.op, meta=meta, entered_at=entry.started_ns / 1e9), entry


def ledger_entries(state: RankState, last: Optional[int] = None) -> Optional[Tuple[Any, ...]]:
    """The rank's ledger entries (the newest ``last`` of them), or ``None`` without a ledger."""
    if state.ledger is None:
        return None
    try:
        entries = state.ledger.entries()
    except Exception:  # noqa: BLE001
        return None
    return tuple(entries[-last:] if last else entries)


def main_thread_stack(state: RankState) -> str:
    """The main thread's Python stack, from the user's task down (launcher frames left out)."""
    frame = sys._current_frames().get(state.main_thread_id)
    if frame is None:
        return "(main thread not found)"
    frames = traceback.extract_stack(frame)
    if not state.in_task:
        return "idle: waiting for the next task"
    user_start = 0
    for index, summary in enumerate(frames):
        if summary.name == "run_task" and summary.filename.startswith(LAUNCH_DIR):
            user_start = index + 1
    while user_start < len(frames) - 1 and frames[user_start].filename.startswith(LAUNCH_DIR):
        user_start += 1
    frames = frames[user_start:]
    return "".join(traceback.format_list(frames)).rstrip()


def _plain_meta(meta: dict) -> dict:
    """The tracer's metadata with only plain values (it travels to the notebook)."""
    plain = {}
    for key, value in tuple((meta or {}).items()):  # one atomic copy: the heartbeat's thread reads a live call's
        if key == "group":  # a process-group handle: the notebook has group_size
            continue
        if key in ("shapes",) and value is not None:
            plain[key] = tuple(tuple(int(d) for d in shape) for shape in value)
        elif key in ("dtypes",) and value is not None:
            plain[key] = tuple(str(d) for d in value)
        elif value is None or isinstance(value, (int, float, str, bool)):
            plain[key] = value
        else:
            plain[key] = str(value)
    return plain
