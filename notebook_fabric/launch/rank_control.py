"""Inside a rank: the side threads that keep the notebook informed while the main thread works.

- the control thread reads the connection: tasks and stop go to the main thread's inbox,
  ``where`` requests are answered at once from ``sys._current_frames()`` (so they work while a
  task is stuck in a collective), and a closed connection (the notebook is gone) ends the rank;
  between messages it sends heartbeats (memory, current collective) every few seconds;
- the collective tracer (installed through ``notebook_fabric.collectives.trace``) records which
  collective the rank is in, cheaply, and optionally sends enter/exit events.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, List, Optional

from ..live.events import CollectiveEntered, CollectiveExited, CollectiveState, Heartbeat, WhereReply
from .processes import kill_own_children
from .protocol import WhereRequest
from ..stepping.messages import InputReply
from ..stepping.rank_prompts import deliver
from .rank_io import Outbox

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(LAUNCH_DIR)


class RankState:
    """What the side threads need to know about the main thread."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.main_thread_id = threading.main_thread().ident
        self.in_task = False
        self.collectives: List[CollectiveState] = []
        self.seq = 0

    @property
    def collective(self) -> Optional[CollectiveState]:
        stack = self.collectives
        return stack[-1] if stack else None


class CollectiveTracer:
    """The ``notebook_fabric.collectives.trace`` tracer of a rank."""

    def __init__(self, state: RankState, outbox: Outbox, send_events: bool) -> None:
        self._state = state
        self._outbox = outbox
        self._send_events = send_events

    def enter(self, op: str, meta: dict) -> CollectiveState:
        state = self._state
        state.seq += 1
        entry = CollectiveState(seq=state.seq, op=op, meta=_plain_meta(meta), entered_at=time.time())
        state.collectives.append(entry)
        if self._send_events:
            self._outbox.put(CollectiveEntered(rank=state.rank, time=entry.entered_at, state=entry))
        return entry

    def exit(self, token: Any, error: Optional[BaseException]) -> None:
        stack = self._state.collectives
        if token in stack:
            stack.remove(token)
        if self._send_events and isinstance(token, CollectiveState):
            self._outbox.put(CollectiveExited(rank=self._state.rank, time=time.time(), seq=token.seq,
                                              error=None if error is None else f"{type(error).__name__}: {error}"))


def install_tracer(tracer: CollectiveTracer) -> bool:
    """Install ``tracer`` if the collective layer is importable; ``False`` when it is not."""
    try:
        from ..collectives.trace import set_tracer
    except ImportError:
        return False
    set_tracer(tracer)
    return True


def start_control_thread(connection: Connection, inbox: "queue.SimpleQueue[Any]", outbox: Outbox,
                         state: RankState, heartbeat_interval: float) -> threading.Thread:
    """Read the connection until it closes (then end the rank and its children at once); answer
    ``where`` requests; send a :class:`Heartbeat` every ``heartbeat_interval`` seconds."""
    import psutil

    process = psutil.Process()

    def beat() -> None:
        try:
            rss = process.memory_info().rss
        except psutil.Error:
            rss = 0
        outbox.put(Heartbeat(rank=state.rank, time=time.time(), rss_bytes=rss, in_task=state.in_task,
                             collective=state.collective))

    def control() -> None:
        next_beat = time.monotonic() + heartbeat_interval
        while True:
            now = time.monotonic()
            if now >= next_beat:
                beat()
                next_beat = now + heartbeat_interval
            try:
                if not connection.poll(max(0.0, next_beat - now)):
                    continue
                message = connection.recv()
            except (EOFError, OSError):
                kill_own_children()
                os._exit(70)
            if isinstance(message, WhereRequest):
                outbox.put(WhereReply(rank=state.rank, time=time.time(), request_id=message.request_id,
                                      stack=main_thread_stack(state), in_task=state.in_task,
                                      collective=state.collective))
            elif isinstance(message, InputReply):  # the main thread waits at a prompt, not in the inbox
                deliver(message)
            else:
                inbox.put(message)

    thread = threading.Thread(target=control, name="notebook-fabric control", daemon=True)
    thread.start()
    return thread


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


def innermost_user_frame(traceback_text: str) -> str:
    """The deepest ``File ..., line N, in f`` line of ``traceback_text`` outside the standard
    library, site-packages and notebook-fabric itself (else the deepest line)."""
    import sysconfig

    paths = sysconfig.get_paths()
    library = tuple({paths["stdlib"], paths["purelib"], paths["platlib"], PACKAGE_DIR})
    frames = [line.strip() for line in traceback_text.splitlines() if line.strip().startswith('File "')]
    for frame in reversed(frames):
        if not frame[len('File "'):].startswith(library):
            return frame
    return frames[-1] if frames else ""


def _plain_meta(meta: dict) -> dict:
    """The tracer's metadata with only plain values (it travels to the notebook)."""
    plain = {}
    for key, value in (meta or {}).items():
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
