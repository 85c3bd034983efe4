"""Operating-system details of rank processes: dying with the parent, describing exits, reaping trees."""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import time
from typing import Iterable, List, Optional

import psutil

_PR_SET_PDEATHSIG = 1

_SIGNAL_HINTS = {
    signal.SIGKILL: "sent by another process, or by the kernel's out-of-memory killer",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGBUS: "bus error",
    signal.SIGABRT: "aborted",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupted",
}


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (no-op elsewhere).

    The signal follows the parent *thread* that forked us: start pools from a thread that
    outlives them (the notebook's main thread does).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = libc_handle()
    if libc is not None:
        try:
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except AttributeError:
            pass


@functools.lru_cache(maxsize=1)
def libc_handle() -> Optional[ctypes.CDLL]:
    """The C library of this process (``CDLL(None)``: no ``find_library``, which runs subprocesses)."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def prepare_to_fork() -> None:
    """Look up, in the notebook, the C functions every forked rank calls as it starts (``prctl``,
    ``fflush``, ``setvbuf``): each rank then inherits them instead of opening the C library and
    resolving them again (a fraction of a millisecond, and pages copied, per rank)."""
    libc = libc_handle()
    if libc is None:
        return
    for name in ("prctl", "fflush", "setvbuf"):
        getattr(libc, name, None)  # ctypes keeps a resolved function on the library object


def describe_exit(exitcode: Optional[int]) -> str:
    """``"exited with code 3"``, ``"killed by signal SIGSEGV (segmentation fault)"``."""
    if exitcode is None:
        return "still running"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        sig = signal.Signals(-exitcode)
    except ValueError:
        return f"killed by signal {-exitcode}"
    hint = _SIGNAL_HINTS.get(sig)
    return f"killed by signal {sig.name}" + (f" ({hint})" if hint else "")


def descendants(pid: int) -> List[psutil.Process]:
    """Every living descendant of ``pid`` (DataLoader workers of a rank, say); empty if it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def kill_all(processes: Iterable[psutil.Process], timeout: float = 3.0) -> None:
    """SIGKILL ``processes`` and wait (up to ``timeout``) until they are gone."""
    alive = []
    for process in processes:
        try:
            process.kill()
            alive.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    if alive:
        psutil.wait_procs(alive, timeout=timeout)


def kill_own_children() -> None:
    """Kill this process's descendants (a rank calls this on its way out)."""
    if has_children() is False:
        return
    kill_all(descendants(os.getpid()), timeout=2.0)


def has_children() -> bool:
    """Whether this process has children, asked with ``waitpid(-1, WNOHANG)`` (it reaps one that has
    ended, if any, and then says "maybe more": the caller looks).

    Not from ``/proc/self/task/*/children``: every ``/proc`` entry a process opens is a cache entry
    the kernel drops when the parent reaps it, and reaping a rank that had read its tasks' files
    cost the notebook up to milliseconds of CPU per rank (issue 19's profile).
    """
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return False
    except OSError:
        return True
    return True


def kill_process_group(pgid: int) -> None:
    """SIGKILL every process left in group ``pgid`` (a rank's group: its children stay in it)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def signal_process(pid: Optional[int], sig: int) -> bool:
    """Send ``sig`` to ``pid``; ``False`` when it no longer exists."""
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def close_inherited_listeners(ports: Iterable[int], candidates: Optional[Iterable[int]] = None) -> None:
    """Close listening sockets on ``ports`` that this (forked) process inherited from the notebook,
    so the ports are released when the notebook closes its own copies.

    ``candidates``: the descriptors the notebook had them on (only those are checked, each still
    verified to be a socket listening on one of ``ports``); without them, every open descriptor
    is looked at (``/proc/self/fd``, whose entries then make the rank slower for the notebook to reap).
    """
    import socket

    wanted = set(ports)
    if not wanted:
        return
    if candidates is not None:
        descriptors = sorted(set(candidates))
    else:
        try:
            descriptors = [int(fd) for fd in os.listdir("/proc/self/fd")]
        except OSError:
            return
    for fd in descriptors:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            port = sock.getsockname()[1] if sock.family in (socket.AF_INET, socket.AF_INET6) else None
        except OSError:
            listening, port = 0, None
        finally:
            sock.detach()
        if listening and port in wanted:
            os.close(fd)
