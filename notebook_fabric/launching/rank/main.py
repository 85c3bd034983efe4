"""The life of a rank process, from connecting to the notebook to ``os._exit``.

1. die with the parent (PR_SET_PDEATHSIG), own process group (only the notebook interrupts us),
2. capture fds 1 and 2, connect to the notebook's event channel (in the background),
3. receive the :class:`RankSetup` (spawn/forkserver) or use the inherited one (fork),
4. set the torchrun variables, build the rank's Fabric with the launcher's ``make_fabric(fabric_kwargs)``,
5. run tasks ``task(fabric, namespace)`` until told to stop; every result or exception is
   queued after the output written before it.
"""
from __future__ import annotations

import faulthandler
import linecache
import os
import queue
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any, Dict, Optional

from ...live.events import RankReady, RankStarted, StartupFailed, TaskDone, TaskFailed, Output
from ...live.channel import connect_to_notebook
from ..errors import describe_exception, pickle_for_parent
from ..processes import close_inherited_listeners, die_with_parent, kill_own_children
from ..protocol import RankBootstrap, RankSetup, RunTask, SetupPayload, StopRank
from ..frames import LAUNCH_DIR
from .control import CollectiveTracer, RankState, start_control_thread
from .ledger import install_ledger, ledger_snapshot
from .output import Outbox, OutputCapture
from .isolation import forget_kernel
from .telemetry import MemorySampler, report_metrics, report_progress
from ..rank_logs import rank_log_paths
from ...utilities.apply import tensors_to_cpu
from ...stepping import rank_prompts
# Imported with the rank's entry point, so a forked rank inherits pdb (and bdb, cmd, code) instead of
# importing them again in every rank on every launch: about 12 ms of CPU per rank (issue 19's profile).
from ...stepping import rank_pdb  # noqa: F401

_SKIP_IN_TRACEBACKS = (LAUNCH_DIR,)


def rank_entry(bootstrap: RankBootstrap, setup: Optional[RankSetup] = None, crash_pipe: Any = None) -> None:
    """Process target of every rank; never returns (ends with ``os._exit``).

    ``crash_pipe`` (or ``bootstrap.crash_fd``) is the write end of a pipe the notebook reads when
    the rank dies: faulthandler writes the Python stacks there on a segfault or abort.
    """
    code = 1
    crash_fd = crash_pipe.fileno() if crash_pipe is not None else bootstrap.crash_fd
    if crash_fd is not None:
        faulthandler.enable(file=crash_fd, all_threads=False)
    try:
        code = _live(bootstrap, setup)
    finally:
        kill_own_children()
        os._exit(code)


def _one_openmp_thread_after_fork() -> None:
    """A forked rank computes on one intra-op thread.

    OpenMP's thread pool does not survive ``fork``: once the notebook has run one multi-threaded
    torch op, a forked child that starts a parallel region of its own waits forever for workers that
    were never copied (seen: both ranks stuck in ``F.linear``). One thread avoids the pool, and is
    what ``torchrun`` gives each rank by default; for more threads per rank use
    ``start_method="spawn"`` or ``"forkserver"``, whose ranks start without the notebook's pool.
    """
    import torch

    torch.set_num_threads(1)


def _live(bootstrap: RankBootstrap, inherited: Optional[RankSetup]) -> int:
    _close_descriptors(bootstrap.close_fds)
    die_with_parent()
    if bootstrap.start_method != "forkserver" and os.getppid() != bootstrap.parent_pid:
        return 71  # the notebook died before we could ask to die with it
    try:
        os.setpgid(0, 0)  # only the notebook interrupts us; our children stay in our group
    except OSError:
        pass
    if bootstrap.start_method == "fork":
        _one_openmp_thread_after_fork()
    rank = bootstrap.rank
    state = RankState(rank)
    _install_interrupt_handler(state)
    inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def on_connected(connection: Any) -> None:
        close_inherited_listeners(bootstrap.close_ports, bootstrap.listening_fds)
        start_control_thread(connection, inbox, outbox, state, bootstrap.heartbeat_interval)

    # Connecting runs in the outbox thread while this thread builds the Fabric.
    outbox = Outbox(lambda: _channel(bootstrap), on_connected)
    outbox.start()
    capture = OutputCapture(lambda stream, text: outbox.put(Output(rank=rank, time=time.time(), stream=stream,
                                                                    text=text)),
                            log_paths=rank_log_paths(bootstrap.log_dir, rank)).start()
    outbox.put(RankStarted(rank=rank, time=time.time(), pid=os.getpid(), host=os.environ.get("NOTEBOOK_FABRIC_HOST", "")))
    memory = MemorySampler(rank, outbox, state).start()  # the one thread reading this rank's RSS
    forget_kernel()  # a rank forked from a kernel is not the kernel
    report_progress(rank, outbox)
    rank_prompts.install(rank, outbox.put, capture.flush)  # input(), sys.stdin, pdb: asked in the notebook
    try:
        setup = inherited if inherited is not None else _receive_setup(inbox)
        os.environ.update(bootstrap.env)
        _adopt_notebook_paths(setup)
        install_ledger(state, CollectiveTracer(state, outbox) if bootstrap.trace_collectives else None)
        fabric = setup.make_fabric(setup.fabric_kwargs)
    except BaseException as error:
        capture.flush()
        outbox.put(StartupFailed(rank=rank, time=time.time(), failure=describe_exception(error, _SKIP_IN_TRACEBACKS)))
        outbox.close()
        return 1
    namespace: Dict[str, Any] = dict(setup.namespace)
    namespace.setdefault("fabric", fabric)
    metrics = report_metrics(fabric, rank, outbox)
    memory.watch(lambda: fabric.accelerator.memory_stats(fabric.device), also=metrics.flush)
    outbox.put(RankReady(rank=rank, time=time.time(), world_size=bootstrap.world_size))

    while True:
        message = _next_message(inbox)
        if isinstance(message, StopRank):
            break
        if isinstance(message, RunTask):
            memory.send()
            event = run_task(message, fabric, namespace, state)
            capture.flush()
            metrics.flush()
            memory.send()
            snapshot = ledger_snapshot(state, message.task_id)
            if snapshot is not None:
                outbox.put(snapshot)
            outbox.put(event)
            if message.exit_after:
                break
    finalize = getattr(fabric, "_finalize_loggers", None)  # a custom make_fabric may build something else
    if callable(finalize):
        finalize("success")
    capture.flush()
    outbox.close()
    return 0


def _channel(bootstrap: RankBootstrap) -> Connection:
    """This rank's connection to the notebook: the socket pair's end a forked rank inherited, else
    dialled (and the launch's key proven) at the notebook's address."""
    if bootstrap.channel_fd is not None:
        return Connection(bootstrap.channel_fd)
    return connect_to_notebook(bootstrap.address, bootstrap.authkey)


def _close_descriptors(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def run_task(message: RunTask, fabric: Any, namespace: Dict[str, Any], state: RankState) -> Any:
    """Run one task; returns the :class:`TaskDone` or :class:`TaskFailed` event to send."""
    from notebook_fabric.utilities import by_value

    rank = state.rank
    interrupted = False
    try:
        _install_sources(message.source_cache)
        task = by_value.loads(message.payload)
        state.in_task = True
        try:
            value = task(fabric, namespace)
        finally:
            state.in_task = False
            rank_prompts.task_ended()
        payload = pickle_for_parent(tensors_to_cpu(value))
        if payload is None:
            raise TypeError(f"the value returned on rank {rank} (a {type(value).__module__}.{type(value).__qualname__}) "
                            "cannot be pickled to send it back to the notebook")
        return TaskDone(rank=rank, time=time.time(), task_id=message.task_id, payload=payload)
    except KeyboardInterrupt as error:
        interrupted = True
        rank_prompts.remember_failure(error)
        failure = describe_exception(error, _SKIP_IN_TRACEBACKS)
    except BaseException as error:  # SystemExit included: a task must not end the rank
        rank_prompts.remember_failure(error)
        failure = describe_exception(error, _SKIP_IN_TRACEBACKS)
    return TaskFailed(rank=rank, time=time.time(), task_id=message.task_id, failure=failure, interrupted=interrupted)


def _next_message(inbox: "queue.SimpleQueue[Any]") -> Any:
    while True:
        try:
            return inbox.get()
        except KeyboardInterrupt:  # an interrupt that arrived just after a task ended
            continue


def _install_interrupt_handler(state: RankState) -> None:
    """SIGINT raises KeyboardInterrupt only while a task runs; between tasks it is ignored."""

    def on_interrupt(signum: int, frame: Any) -> None:
        if state.in_task:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)


def _receive_setup(inbox: "queue.SimpleQueue[Any]", timeout: float = 120.0) -> RankSetup:
    """The cloudpickled setup (spawn, forkserver): the first message the notebook sends."""
    from notebook_fabric.utilities import by_value

    message = inbox.get(timeout=timeout)
    if not isinstance(message, SetupPayload):
        raise RuntimeError(f"expected the rank setup from the notebook, got {type(message).__name__}")
    return by_value.loads(message.payload)


def _adopt_notebook_paths(setup: RankSetup) -> None:
    for path in reversed(setup.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    _install_sources(setup.source_cache)


def _install_sources(source_cache: Dict[str, Any]) -> None:
    """Register notebook cells' source so tracebacks and stacks show their lines."""
    for filename, entry in (source_cache or {}).items():
        linecache.cache.setdefault(filename, entry)
