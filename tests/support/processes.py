"""What counts as a leaked process, fd or port, and the marker files ranks write for a test.

``multiprocessing``'s own long-lived helpers (the fork server and its resource tracker) are
not ranks: they are started once per process by the standard library, by design, and are left
out of the leak checks.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, List, Optional, Set

import psutil

from support.waiting import WaitTimeout, poll, wait_until


def is_multiprocessing_helper(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing.forkserver" in command or "multiprocessing.resource_tracker" in command


def living_descendants(pid: Optional[int] = None) -> List[psutil.Process]:
    """Living descendants of ``pid`` (default: this process), minus multiprocessing's helpers and zombies."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE or is_multiprocessing_helper(child):
                continue
        except psutil.Error:
            continue
        found.append(child)
    return found


def kill_and_reap(processes: List[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL each of ``processes`` (those already gone are skipped) and wait for them."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=timeout)


def rank_like_children() -> List[psutil.Process]:
    """Living descendants of this process, minus multiprocessing's helpers and zombies."""
    return living_descendants()


def wait_no_children(timeout: float = 10.0) -> List[psutil.Process]:
    """Children still alive after ``timeout`` seconds (empty list: all gone)."""
    poll(lambda: not rank_like_children(), timeout)
    return rank_like_children()


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: List[int], timeout: float = 15.0) -> List[int]:
    """The pids still alive (not zombies) after up to ``timeout`` seconds."""
    poll(lambda: not any(pid_alive(pid) for pid in pids), timeout, interval=0.1)
    return [pid for pid in pids if pid_alive(pid)]


def listening_ports() -> Set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections() if c.status == psutil.CONN_LISTEN}


def open_connections() -> int:
    return len(psutil.Process().net_connections())


def open_fds() -> int:
    return psutil.Process().num_fds()


def touch(path: str) -> None:
    """Create ``path`` (ranks use it to tell a test they reached a point)."""
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))


def wait_for_file(path: str, timeout: float = 60.0) -> bool:
    """Whether ``path`` exists within ``timeout`` seconds."""
    return bool(poll(lambda: os.path.exists(path), timeout, interval=0.02))


def touch_once_main_thread_waits_in(function_name: str, path: str) -> None:
    """In a rank: a side thread touches ``path`` once the main thread's innermost Python frame is
    ``torch.distributed``'s ``function_name`` (the rank is really inside the collective)."""

    def inside() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident)
        return (frame is not None and frame.f_code.co_name == function_name
                and "distributed" in frame.f_code.co_filename)  # fmt: skip

    def watch() -> None:
        if poll(inside, timeout=600, interval=0.01):
            touch(path)

    threading.Thread(target=watch, daemon=True).start()


class InterruptWhen:
    """A side thread that sends SIGINT to this process once ``predicate`` holds.

    If it does not hold within ``timeout``, the thread interrupts anyway (so the blocked main thread
    comes back) and :meth:`check` fails naming what it waited for.
    """

    def __init__(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            raise RuntimeError(f"SIGINT is handled by {signal.getsignal(signal.SIGINT)!r} in this process, so it cannot "
                               "raise KeyboardInterrupt (a background job of a shell ignores it: see tests/conftest.py)")
        self.failure: Optional[WaitTimeout] = None
        self._predicate, self._timeout, self._what = predicate, timeout, what
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            wait_until(self._predicate, self._timeout, self._what)
        except WaitTimeout as failure:
            self.failure = failure
        os.kill(os.getpid(), signal.SIGINT)

    def check(self) -> None:
        """Fail if the interrupt was sent without the state it waited for."""
        self._thread.join(timeout=self._timeout)
        if self.failure is not None:
            raise self.failure
