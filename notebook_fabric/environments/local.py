"""Ranks on this machine, started by notebook-fabric itself (or by anything that sets the torchrun variables)."""
from __future__ import annotations

import os
import socket

from .base import ClusterEnvironment


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out on ``host``. Prefer holding a listening socket over this."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalEnvironment(ClusterEnvironment):
    """The default: one node (or several with explicit node ranks), ranks set through
    ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``LOCAL_RANK``/``NODE_RANK``/``WORLD_SIZE``.

    When ``LOCAL_RANK`` is set the ranks already exist (our launchers set it in every child);
    otherwise this process is rank 0 of a job notebook-fabric will start.
    """

    def __init__(self) -> None:
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._global_rank = int(os.environ.get("RANK", 0))
        self._main_port = -1

    @property
    def creates_processes_externally(self) -> bool:
        return "LOCAL_RANK" in os.environ

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:  # a launcher may set it after this object was built
            return int(os.environ["MASTER_PORT"])
        if self._main_port == -1:
            self._main_port = find_free_port()
        return self._main_port

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        self._world_size = size

    def global_rank(self) -> int:
        return self._global_rank

    def set_global_rank(self, rank: int) -> None:
        self._global_rank = rank

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    def node_rank(self) -> int:
        return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
