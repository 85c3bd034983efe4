"""The interface every cluster environment implements: where ranks come from."""
from __future__ import annotations

from abc import ABC, abstractmethod


class ClusterEnvironment(ABC):
    """Tells a strategy the shape of the job and where to rendezvous.

    Subclass it to support a scheduler we do not know about::

        class MyCluster(ClusterEnvironment):
            creates_processes_externally = True
            main_address = "10.0.0.1"
            main_port = 29500
            @staticmethod
            def detect() -> bool: return "MY_RANK" in os.environ
            def world_size(self) -> int: return int(os.environ["MY_WORLD"])
            ...
        fabric = Fabric(plugins=[MyCluster()])
    """

    @property
    @abstractmethod
    def creates_processes_externally(self) -> bool:
        """True when something outside notebook-fabric already started every rank."""

    @property
    @abstractmethod
    def main_address(self) -> str:
        """Address of the rank-0 host, used for the rendezvous."""

    @property
    @abstractmethod
    def main_port(self) -> int:
        """Port of the rendezvous store on the rank-0 host."""

    @staticmethod
    @abstractmethod
    def detect() -> bool:
        """Whether the current process runs inside this environment."""

    @abstractmethod
    def world_size(self) -> int:
        """Total number of ranks in the job."""

    @abstractmethod
    def set_world_size(self, size: int) -> None:
        """Record the world size the strategy computed (ignored where the scheduler decides)."""

    @abstractmethod
    def global_rank(self) -> int:
        """Rank of this process across all nodes."""

    @abstractmethod
    def set_global_rank(self, rank: int) -> None:
        """Record the global rank the strategy computed (ignored where the scheduler decides)."""

    @abstractmethod
    def local_rank(self) -> int:
        """Rank of this process on its node."""

    @abstractmethod
    def node_rank(self) -> int:
        """Index of this node."""

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """Raise ``ValueError`` when the Fabric arguments contradict the environment."""

    def teardown(self) -> None:
        """Undo whatever the environment changed (for example environment variables)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
