"""What counts as a leaked process, fd or port, and the marker files ranks write for a test.

``multiprocessing``'s own long-lived helpers (the fork server and its resource tracker) are
not ranks: they are started once per process by the standard library, by design, and are left
out of the leak checks.
"""
from __future__ import annotations

import _thread
import os
import warnings
import signal
import sys
import threading
import time
from pathlib import Path
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


RESEND_AFTER_S = 15.0


def _signal_state() -> str:
    """This process' pending, blocked and caught signal masks (from /proc), for a report."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return "no /proc"
    return ", ".join(line.replace("\t", " ") for line in lines if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn")))


class InterruptWhen:
    """A side thread that sends SIGINT to this process once ``predicate`` holds.

    If it does not hold within ``timeout``, the thread interrupts anyway (so the blocked main thread
    comes back) and :meth:`check` fails naming what it waited for.
    """

    def __init__(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        self.failure: Optional[WaitTimeout] = None
        self.resent = ""
        self._checked = threading.Event()
        self._test_frame = sys._getframe(1)  # the test that waits for the interrupt
        self._predicate, self._timeout, self._what = predicate, timeout, what
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            wait_until(self._predicate, self._timeout, self._what)
        except WaitTimeout as failure:
            self.failure = failure
        os.kill(os.getpid(), signal.SIGINT)
        if not self._checked.wait(RESEND_AFTER_S) and self._test_still_running():
            # the interrupt did not come back as KeyboardInterrupt (seen once in a full run, not
            # reproduced alone; SIGALRM still reached the main thread then): say what the process'
            # signal masks were, then raise it in the main thread the way the OS signal would have
            self.resent = _signal_state()
            warnings.warn(f"SIGINT sent {RESEND_AFTER_S:g} s ago had no effect; interrupting the main thread"
                          f" directly ({self.resent})")
            _thread.interrupt_main(signal.SIGINT)

    def _test_still_running(self) -> bool:
        """Whether the main thread is still inside the test that made us (never interrupt a later one)."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None:
            if frame is self._test_frame:
                return True
            frame = frame.f_back
        return False

    def check(self) -> None:
        """Fail if the interrupt was sent without the state it waited for."""
        self._checked.set()
        self._thread.join(timeout=self._timeout)
        if self.failure is not None:
            raise self.failure
