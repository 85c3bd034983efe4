"""Starting one rank process with fork, forkserver or spawn, behind one small interface.

- ``fork`` and ``forkserver`` are ``multiprocessing``'s; the fork server preloads torch and the
  rank code, so its ranks start nearly as fast as forked ones without inheriting the notebook's
  threads or CUDA state. A forked rank's event channel is a socket pair made just before the
  fork: only the two processes hold its ends, so it needs no listening port, no connect and no
  challenge (the others dial back and prove the launch's key).
- ``spawn`` starts a fresh interpreter with ``subprocess`` running :mod:`.rank.spawn_child`: unlike
  ``multiprocessing``'s spawn it never re-imports the caller's ``__main__`` (the kernel module in
  a notebook, the whole script elsewhere), so scripts need no ``if __name__ == "__main__"`` guard
  and notebook ranks do not import ipykernel. The bootstrap travels on the child's stdin.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Optional, Protocol, Sequence

from .protocol import RankBootstrap, RankSetup
from .rank.main import rank_entry
from ..strategies.start_methods import inherits_memory

FORKSERVER_PRELOAD = ["torch", "torch.distributed", "notebook_fabric.launching.rank.main", "notebook_fabric.fabric"]


class RankProcess(Protocol):
    """What the pool needs from a rank process."""

    pid: int

    @property
    def exitcode(self) -> Optional[int]: ...  # None while running; -N when killed by signal N

    @property
    def sentinel(self) -> Optional[int]: ...  # a descriptor that becomes readable at exit, if any

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...

    def last_words(self) -> str: ...  # what the dead rank's faulthandler wrote, if anything


def read_available(fd: int, limit: int = 65536) -> str:
    """What can be read from ``fd`` right now (never blocks; the writer may be a dead rank's child)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while sum(map(len, chunks)) < limit:
            data = os.read(fd, limit)
            if not data:
                break
            chunks.append(data)
    except (BlockingIOError, OSError):
        pass
    return b"".join(chunks).decode("utf-8", "replace")


def open_pidfd(pid: int) -> Optional[int]:
    """A descriptor that turns readable when ``pid`` can be reaped (Linux 5.3+), or ``None``."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


class MultiprocessingRank:
    """A rank started by a ``multiprocessing`` context (fork or forkserver).

    Forked, it also has ``channel``: the notebook's end of the rank's event channel (see the module
    docstring); ``close_in_child`` are the notebook's ends of its elder ranks' channels, which the
    rank closes (only the notebook may hold them)."""

    def __init__(self, method: str, bootstrap: RankBootstrap, setup: Optional[RankSetup],
                 close_in_child: Sequence[int] = ()) -> None:
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            _preload_forkserver(context)
        self.channel: Optional[Connection] = None
        ours = theirs = None
        if method == "fork":
            ours, theirs = socket.socketpair()
            bootstrap = dataclasses.replace(bootstrap, channel_fd=theirs.fileno(),
                                            close_fds=(*close_in_child, ours.fileno()))
        self._crash_read, crash_write = context.Pipe(duplex=False)
        self._process = context.Process(target=rank_entry, args=(bootstrap, setup, crash_write),
                                        name=f"notebook-fabric rank {bootstrap.rank}", daemon=False)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                self._process.start()
        except BaseException:
            for end in (ours, theirs):
                if end is not None:
                    end.close()
            raise
        finally:
            crash_write.close()
        if theirs is not None:
            theirs.close()
            self.channel = Connection(ours.detach())
        self.pid: int = self._process.pid
        # A forked rank is our child: its pidfd turns readable once it can be reaped, whereas
        # multiprocessing's sentinel pipe closes while the kernel still tears the process down
        # (the supervisor then polls until the exit code shows). The forkserver's ranks keep the
        # pipe: their exit code travels on it.
        self._pidfd = open_pidfd(self.pid) if method == "fork" else None

    def last_words(self) -> str:
        return read_available(self._crash_read.fileno())

    @property
    def exitcode(self) -> Optional[int]:
        return self._process.exitcode

    @property
    def sentinel(self) -> Optional[int]:
        return self._pidfd if self._pidfd is not None else self._process.sentinel

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def close(self) -> None:
        self._crash_read.close()
        if self.channel is not None:
            self.channel.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        try:
            self._process.join(timeout=0)
            self._process.close()
        except ValueError:
            pass


class SubprocessRank:
    """A rank in a fresh interpreter (the ``spawn`` start method)."""

    def __init__(self, bootstrap: RankBootstrap) -> None:
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
        self._crash_read, crash_write = os.pipe()
        bootstrap = dataclasses.replace(bootstrap, crash_fd=crash_write)
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", "from notebook_fabric.launching.rank.spawn_child import main; main()"],
                stdin=subprocess.PIPE, env=env, close_fds=True, pass_fds=(crash_write,),
            )
        finally:
            os.close(crash_write)
        self.pid: int = self._popen.pid
        try:
            self._popen.stdin.write(pickle.dumps(bootstrap))
            self._popen.stdin.close()
        except OSError:  # it died at once; its exit code tells why
            pass
        self._pidfd = open_pidfd(self.pid)

    @property
    def exitcode(self) -> Optional[int]:
        return self._popen.poll()

    @property
    def sentinel(self) -> Optional[int]:
        return self._pidfd

    def terminate(self) -> None:
        if self._popen.poll() is None:
            self._popen.terminate()

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def last_words(self) -> str:
        return read_available(self._crash_read)

    def close(self) -> None:
        if self._crash_read is not None:
            os.close(self._crash_read)
            self._crash_read = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def start_rank(method: str, bootstrap: RankBootstrap, inherited: Optional[RankSetup],
               close_in_child: Sequence[int] = ()) -> RankProcess:
    """Start one rank; ``inherited`` (fork only) is handed over in memory instead of pickled.
    ``close_in_child`` (fork): descriptors of the notebook's the rank closes first (its elders' channels).

    The parent-death signal of a rank fires when the *thread* that started it ends, so ranks are
    started from the main thread, or else from one long-lived starter thread.
    """
    if threading.current_thread() is threading.main_thread():
        return _start_rank(method, bootstrap, inherited, close_in_child)
    return _starter_thread().submit(_start_rank, method, bootstrap, inherited, close_in_child).result()


def _start_rank(method: str, bootstrap: RankBootstrap, inherited: Optional[RankSetup],
                close_in_child: Sequence[int] = ()) -> RankProcess:
    if method == "spawn":
        return SubprocessRank(bootstrap)
    return MultiprocessingRank(method, bootstrap, inherited if inherits_memory(method) else None, close_in_child)


@functools.lru_cache(maxsize=1)
def _starter_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="notebook-fabric starter")


def _preload_forkserver(context) -> None:
    """Ask the fork server (if it is not running yet) to import torch and our rank code once."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    existing = list(getattr(server, "_preload_modules", []) or [])
    wanted = existing + [m for m in FORKSERVER_PRELOAD if m not in existing]
    if wanted != existing:
        context.set_forkserver_preload(wanted)
