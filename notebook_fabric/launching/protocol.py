"""What the notebook tells ranks: the start-up parcel and the control messages.

Events in the other direction (ranks -> notebook) live in :mod:`notebook_fabric.live.events`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class RankBootstrap:
    """The few plain values a rank needs to reach the notebook; passed as the process argument.

    It pickles with the standard library (spawn and forkserver send it that way); everything
    else a rank needs comes as a :class:`RankSetup`.
    """

    rank: int
    world_size: int
    address: Tuple[str, int]
    authkey: bytes
    parent_pid: int
    start_method: str
    env: Dict[str, str]
    heartbeat_interval: float = 2.0
    trace_collectives: bool = False
    close_ports: Tuple[int, ...] = ()  # the notebook's listening sockets a forked rank inherits and closes
    listening_fds: Optional[Tuple[int, ...]] = None  # where the notebook holds them (None: look at every descriptor)
    crash_fd: Optional[int] = None  # spawn: where faulthandler writes (fork/forkserver get a pipe object)
    log_dir: Optional[str] = None  # the rank appends its stdout and stderr to rank<N>/stdout.log, stderr.log here
    channel_fd: Optional[int] = None  # fork: the rank's end of a socket pair to the notebook (no connect, no challenge)
    close_fds: Tuple[int, ...] = ()  # fork: the notebook's ends of the pairs, this rank's and its elders', to close


@dataclass
class RankSetup:
    """What a rank builds and keeps: inherited as is under fork, cloudpickled under spawn/forkserver.

    ``make_fabric(fabric_kwargs)`` returns the rank's prepared Fabric (the launcher's choice, e.g.
    ``notebook_fabric.fabric.build_rank_fabric``: the rank side never imports ``fabric.py``); ``namespace`` seeds the rank's
    persistent namespace; ``sys_path`` and ``source_cache`` (``linecache`` entries of notebook
    cells) make functions and tracebacks from the notebook work in a fresh interpreter.
    """

    fabric_kwargs: Dict[str, Any]
    make_fabric: Callable[[Dict[str, Any]], Any]
    namespace: Dict[str, Any] = field(default_factory=dict)
    sys_path: List[str] = field(default_factory=list)
    source_cache: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SetupPayload:
    """A :class:`RankSetup` pickled with cloudpickle (spawn and forkserver only)."""

    payload: bytes


@dataclass(frozen=True)
class RunTask:
    """Run ``task(fabric, namespace)``; ``payload`` is the task pickled with cloudpickle."""

    task_id: int
    payload: bytes
    source_cache: Dict[str, Any] = field(default_factory=dict)
    exit_after: bool = False  # one-shot launch: exit right after answering (overlaps exit with the reply)


@dataclass(frozen=True)
class WhereRequest:
    """Answer with the main thread's stack (answered by a side thread, even mid-task)."""

    request_id: int
    ledger: bool = False  # also send the rank's collective ledger


@dataclass(frozen=True)
class StopRank:
    """Leave the task loop and exit."""
