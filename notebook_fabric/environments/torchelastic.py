"""Ranks started by torchrun (``torch.distributed.run``), which ``notebook-fabric run`` is built on."""
from __future__ import annotations

import os

from ._variables import check_rank, read_int, read_str, require_port
from .scheduled import SchedulerEnvironment

_WHO = "TorchElasticEnvironment"
_HINT = (
    "torchrun sets it in every worker: start the script with `notebook-fabric run` (or torchrun),"
    " or pass another ClusterEnvironment in Fabric(plugins=[...])."
)


class TorchElasticEnvironment(SchedulerEnvironment):
    """The job shape as torchrun exported it to this worker.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``, ``GROUP_RANK`` (the node
    rank), ``MASTER_ADDR`` and ``MASTER_PORT`` once, when constructed, and raises ``ValueError``
    naming the variable when one is missing or out of range. torchrun started every rank, so
    ``creates_processes_externally`` is true and ``Fabric.launch()`` only joins the process group.
    """

    def __init__(self) -> None:
        self._world_size = read_int(["WORLD_SIZE"], _WHO, _HINT, minimum=1)
        self._global_rank = read_int(["RANK"], _WHO, _HINT)
        check_rank("RANK", self._global_rank, "WORLD_SIZE", self._world_size)
        self._local_world_size = read_int(["LOCAL_WORLD_SIZE"], _WHO, _HINT, minimum=1)
        self._local_rank = read_int(["LOCAL_RANK"], _WHO, _HINT)
        check_rank("LOCAL_RANK", self._local_rank, "LOCAL_WORLD_SIZE", self._local_world_size)
        self._node_rank = read_int(["GROUP_RANK"], _WHO, _HINT)
        self._main_address = read_str(["MASTER_ADDR"], _WHO, _HINT)
        self._main_port = require_port("MASTER_PORT", _WHO, _HINT)

    @property
    def main_address(self) -> str:
        return self._main_address

    @property
    def main_port(self) -> int:
        return self._main_port

    @staticmethod
    def detect() -> bool:
        """True inside a worker that torchrun started (it always sets ``TORCHELASTIC_RUN_ID``)."""
        return "TORCHELASTIC_RUN_ID" in os.environ

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """``ValueError`` when ``devices x num_nodes`` is not the world torchrun started, or ``devices``
        not the ranks it started per node."""
        if num_devices * num_nodes != self._world_size or num_devices != self._local_world_size:
            raise ValueError(
                f"Fabric(devices={num_devices}, num_nodes={num_nodes}) asks for {num_devices * num_nodes}"
                f" ranks ({num_devices} per node), but torchrun started this process as rank {self._global_rank}"
                f" of WORLD_SIZE={self._world_size} ({self._local_world_size} per node). Make them agree:"
                f" start the script with `notebook-fabric run --devices {self._local_world_size}"
                f" --num-nodes {self._world_size // self._local_world_size}`, or set devices and"
                " num_nodes in Fabric(...) to match torchrun's --nproc-per-node and --nnodes (or leave them"
                " to 'auto'); to run this process on its own, pass strategy='single_device'."
            )

