"""Ranks on this machine, started by notebook-fabric itself (or by anything that sets the torchrun variables)."""
from __future__ import annotations

import os
import socket
from typing import Optional

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

    def local_world_size(self) -> int:
        """Ranks on this node, as the launcher's variables say (``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE``)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """When a launcher started this process (``LOCAL_RANK`` set), ``ValueError`` naming the conflict if
        ``devices x num_nodes`` is not its ``WORLD_SIZE`` or ``devices`` not its ``LOCAL_WORLD_SIZE``:
        a Fabric half from the arguments and half from the environment would fail later, obscurely."""
        if not self.creates_processes_externally:
            return
        per_node = os.environ.get("LOCAL_WORLD_SIZE")
        check_against_launcher(num_devices, num_nodes, world_size=int(os.environ.get("WORLD_SIZE", 1)),
                               local_world_size=int(per_node) if per_node is not None else None,
                               rank=self._global_rank, local_rank=self.local_rank())


def check_against_launcher(num_devices: int, num_nodes: int, *, world_size: int, local_world_size: Optional[int],
                           rank: int, local_rank: int, launcher: str = "a launcher (torchrun or similar)") -> None:
    """``ValueError`` when ``Fabric(devices=num_devices, num_nodes=num_nodes)`` contradicts the job the
    environment variables describe (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).
    ``local_world_size=None`` (the launcher did not say) checks the total only."""
    conflicts = []
    if num_devices * num_nodes != world_size:
        conflicts.append(f"devices x num_nodes = {num_devices * num_nodes} ranks, but WORLD_SIZE={world_size}")
    if local_world_size is not None and num_devices != local_world_size:
        conflicts.append(f"devices={num_devices} per node, but LOCAL_WORLD_SIZE={local_world_size}")
    if not conflicts:
        return
    per_node = local_world_size if local_world_size is not None else max(1, world_size // num_nodes)
    raise ValueError(
        f"Fabric(devices={num_devices}, num_nodes={num_nodes}) contradicts the environment: this process was"
        f" started by {launcher} as rank {rank} (LOCAL_RANK={local_rank}) of WORLD_SIZE={world_size}"
        f" ({'; '.join(conflicts)}). Either make the arguments match the job (devices={per_node},"
        f" num_nodes={max(1, world_size // max(1, per_node))}, or leave them to 'auto'), or, to run this"
        " process on its own, pass strategy='single_device' (or unset WORLD_SIZE, RANK, LOCAL_RANK and"
        " LOCAL_WORLD_SIZE before creating the Fabric)."
    )
