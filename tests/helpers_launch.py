"""Shared helpers of the launch tests: what counts as a leaked process, fd or port.

``multiprocessing``'s own long-lived helpers (the fork server and its resource tracker) are
not ranks: they are started once per process by the standard library, by design, and are left
out of the leak checks.
"""
from __future__ import annotations

import os
import time
from typing import List, Set

import psutil


def is_multiprocessing_helper(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing.forkserver" in command or "multiprocessing.resource_tracker" in command


def rank_like_children() -> List[psutil.Process]:
    """Living descendants of this process, minus multiprocessing's helpers and zombies."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or is_multiprocessing_helper(child):
                continue
        except psutil.Error:
            continue
        found.append(child)
    return found


def wait_no_children(timeout: float = 10.0) -> List[psutil.Process]:
    """Children still alive after ``timeout`` seconds (empty list: all gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = rank_like_children()
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def listening_ports() -> Set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections() if c.status == psutil.CONN_LISTEN}


def open_connections() -> int:
    return len(psutil.Process().net_connections())


def open_fds() -> int:
    return psutil.Process().num_fds()


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def touch(path: str) -> None:
    """Create ``path`` (ranks use it to tell a test they reached a point)."""
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))


def wait_for_file(path: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
