"""What ranks tell the notebook: the events that travel on the event channel.

Every event is a small frozen dataclass that names its ``rank``. Ranks create them, the channel
pickles them, and the parent hands them to an :class:`~notebook_fabric.live.sinks.EventSink`
(the text printer, the dashboard, a test recorder). Values and exceptions travel as pickled
bytes inside the events, so a payload that cannot be unpickled in the notebook spoils one event,
not the channel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class RankEvent:
    """Base of every event: which rank sent it, and when (``time.time()`` in the rank)."""

    rank: int
    time: float


@dataclass(frozen=True)
class RankStarted(RankEvent):
    """The rank connected to the notebook; its process id (and its host, where that is another one)."""

    pid: int
    host: str = ""


@dataclass(frozen=True)
class RankReady(RankEvent):
    """The rank built its Fabric and joined the process group; it now waits for tasks."""

    world_size: int


@dataclass(frozen=True)
class Output(RankEvent):
    """A chunk of what the rank wrote to file descriptor 1 or 2 (Python and C alike).

    ``stream`` is ``"stdout"`` or ``"stderr"``. Chunks of one rank and stream arrive in the order
    they were written; a chunk may hold several lines or part of one.
    """

    stream: str
    text: str


@dataclass(frozen=True)
class CollectiveState:
    """Where a rank stands in the collective sequence (from the collective tracer)."""

    seq: int
    op: str
    meta: Dict[str, Any]
    entered_at: float

    def describe(self, now: Optional[float] = None) -> str:
        """``"all_reduce #17 (float32[4, 8]) for 12.0 s"``."""
        shapes = self.meta.get("shapes") or ()
        dtypes = self.meta.get("dtypes") or ()
        parts = [f"{str(d).replace('torch.', '')}{list(s)}" for s, d in zip(shapes, dtypes)]
        name = self.meta.get("name")
        detail = self.meta.get("detail") or ", ".join(([f"name={name!r}"] if name else []) + parts)
        text = f"{self.meta.get('via') or self.op} #{self.seq}" + (f" ({detail})" if detail else "")
        if self.meta.get("place"):
            text += f" at {self.meta['place']}"
        if now is not None:
            text += f" for {max(0.0, now - self.entered_at):.1f} s"
        return text


@dataclass(frozen=True)
class Heartbeat(RankEvent):
    """Sent every few seconds: the rank is alive; its resident memory and current collective."""

    rss_bytes: int
    in_task: bool
    collective: Optional[CollectiveState] = None


@dataclass(frozen=True)
class CollectiveEntered(RankEvent):
    """The rank entered a collective (sent only when per-collective events are switched on)."""

    state: CollectiveState


@dataclass(frozen=True)
class CollectiveExited(RankEvent):
    """The rank left collective ``seq``; ``error`` is the exception text if it failed."""

    seq: int
    error: Optional[str] = None


@dataclass(frozen=True)
class TaskDone(RankEvent):
    """A task returned; ``payload`` is its value pickled with cloudpickle (tensors moved to CPU)."""

    task_id: int
    payload: bytes


@dataclass(frozen=True)
class RemoteFailure:
    """An exception raised in a rank, in a form that survives the trip to the notebook.

    ``pickled`` is the exception itself (cloudpickle) when it could be pickled, else ``None``;
    ``traceback`` is the formatted traceback as the rank saw it.
    """

    type_name: str
    module: str
    message: str
    traceback: str
    pickled: Optional[bytes] = None
    host: str = ""  # the rank's host, where it runs on another one (NOTEBOOK_FABRIC_HOST)

    @property
    def qualified_type(self) -> str:
        return self.type_name if self.module in ("builtins", "") else f"{self.module}.{self.type_name}"

    @property
    def summary(self) -> str:
        """``"ValueError: bad value"``."""
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


@dataclass(frozen=True)
class TaskFailed(RankEvent):
    """A task raised; ``interrupted`` when it was a KeyboardInterrupt the notebook asked for."""

    task_id: int
    failure: RemoteFailure
    interrupted: bool = False


@dataclass(frozen=True)
class StartupFailed(RankEvent):
    """Building the Fabric or joining the process group failed in this rank."""

    failure: RemoteFailure


@dataclass(frozen=True)
class WhereReply(RankEvent):
    """Answer to a ``where`` request: the rank's main-thread stack, and its collective if any."""

    request_id: int
    stack: str
    in_task: bool
    collective: Optional[CollectiveState] = None
    waiting: Any = None  # the collective ledger's entry this rank waits in (a LedgerEntry), if any
    ledger: Optional[Tuple[Any, ...]] = None  # the rank's ledger entries, when the request asked for them


@dataclass(frozen=True)
class LedgerSnapshot(RankEvent):
    """The rank's collective ledger at the end of a task (sent before its result when it changed)."""

    task_id: int
    entries: Tuple[Any, ...]


@dataclass(frozen=True)
class RankExited(RankEvent):
    """Seen by the parent: the rank's process ended. ``expected`` when the pool asked it to."""

    exitcode: Optional[int]
    description: str
    expected: bool = False
    last_words: str = ""  # what faulthandler wrote as it crashed (segfault, abort), if anything


@dataclass(frozen=True)
class Notice(RankEvent):
    """A message from the launcher itself (``rank`` -1), e.g. "switched to spawn", a stall warning."""

    text: str
    level: str = "info"
    details: Tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class TaskStarted(RankEvent):
    """Seen by the parent: task ``task_id`` was sent to this rank (``time`` is the notebook's)."""

    task_id: int


@dataclass(frozen=True)
class MemorySample(RankEvent):
    """The rank's memory, sampled off its training thread (and right before and after each task).

    Host: resident memory and its peak (``VmHWM``). Device (CUDA ranks that initialised CUDA):
    bytes allocated and reserved by the caching allocator, the peak allocated, and the device's
    total; ``None`` on CPU ranks.
    """

    rss_bytes: int
    rss_peak_bytes: int
    device: Optional[str] = None
    allocated_bytes: Optional[int] = None
    reserved_bytes: Optional[int] = None
    peak_allocated_bytes: Optional[int] = None
    total_bytes: Optional[int] = None


@dataclass(frozen=True)
class Progress(RankEvent):
    """A tqdm bar in the rank was drawn (at most as often as tqdm redraws it) or closed.

    ``bar`` tells bars of one rank apart; ``total`` is ``None`` for bars of unknown length;
    ``rate`` is in ``unit`` per second, ``None`` until tqdm knows it.
    """

    bar: int
    desc: str
    n: float
    total: Optional[float]
    rate: Optional[float]
    unit: str = "it"
    elapsed: float = 0.0
    closed: bool = False


@dataclass(frozen=True)
class Metrics(RankEvent):
    """Scalars the rank logged with ``fabric.log`` / ``fabric.log_dict``, in the order logged.

    ``points`` holds one ``(step, {name: value})`` per call (``step`` as given, or ``None``); the
    rank sends the calls of a quarter second together.
    """

    points: Tuple[Tuple[Optional[int], Dict[str, float]], ...]


def barrier_name(state: Optional[CollectiveState]) -> Optional[str]:
    """The name a ``barrier(name)`` was given, if ``state`` is such a barrier."""
    if state is None or state.op != "barrier":
        return None
    name = state.meta.get("name")
    return str(name) if name else None
