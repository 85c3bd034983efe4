"""What every scheduler-started environment (torchrun, SLURM, MPI) shares: the scheduler decides."""
from __future__ import annotations

from .base import ClusterEnvironment


class SchedulerEnvironment(ClusterEnvironment):
    """Ranks started by a scheduler, which fixed the world size and every rank before Python ran.

    Subclasses read ``_world_size``, ``_global_rank``, ``_local_rank``, ``_local_world_size`` (and
    where they know it ``_node_rank``) in ``__init__``; the setters are no-ops.
    """

    _world_size: int
    _global_rank: int
    _local_rank: int
    _local_world_size: int
    _node_rank: int = 0

    @property
    def creates_processes_externally(self) -> bool:
        return True

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        """Ignored: the scheduler decided the world size."""

    def global_rank(self) -> int:
        return self._global_rank

    def set_global_rank(self, rank: int) -> None:
        """Ignored: the scheduler decided the rank."""

    def local_rank(self) -> int:
        return self._local_rank

    def local_world_size(self) -> int:
        """Ranks on this node."""
        return self._local_world_size

    def node_rank(self) -> int:
        return self._node_rank

    def __repr__(self) -> str:  # no main address: MPI may need a collective to learn it
        return (
            f"{type(self).__name__}(rank={self._global_rank}/{self._world_size},"
            f" local_rank={self._local_rank}, node_rank={self.node_rank()})"
        )
