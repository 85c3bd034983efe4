"""What every multi-process strategy shares: ranks from a cluster environment, collectives, samplers."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..accelerators import Accelerator
from ..collectives import ops
from ..environments.base import ClusterEnvironment
from ..precision import Precision
from .base import Strategy


class ParallelStrategy(Strategy):
    """Ranks across devices and nodes; collectives go through ``collectives.ops`` once a process group exists."""

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision=precision)
        self.parallel_devices = parallel_devices
        self.cluster_environment = cluster_environment
        self._num_nodes = 1

    @property
    def root_device(self) -> torch.device:
        if self._root_device is not None:
            return self._root_device
        if not self.parallel_devices:
            return torch.device("cpu")
        return self.parallel_devices[self.local_rank % len(self.parallel_devices)]

    @root_device.setter
    def root_device(self, device: torch.device) -> None:
        self._root_device = device

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def global_rank(self) -> int:
        return self.cluster_environment.global_rank() if self.cluster_environment is not None else 0

    @property
    def local_rank(self) -> int:
        return self.cluster_environment.local_rank() if self.cluster_environment is not None else 0

    @property
    def node_rank(self) -> int:
        return self.cluster_environment.node_rank() if self.cluster_environment is not None else 0

    @property
    def world_size(self) -> int:
        return self.cluster_environment.world_size() if self.cluster_environment is not None else 1

    @property
    def distributed_sampler_kwargs(self) -> Optional[dict[str, int]]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def configure(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        if self.cluster_environment is None:
            return
        self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        self.cluster_environment.set_world_size(num_nodes * self.num_processes)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _device_ids(self) -> Optional[list[int]]:
        return [self.root_device.index] if self.root_device.type == "cuda" else None

    # ----- collectives ---------------------------------------------------------------------------
    def reduce(self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Tensor:
        if not self.distributed:
            return tensor
        return ops.all_reduce(tensor, reduce_op=reduce_op, group=group)

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if not self.distributed or (group is None and self.world_size == 1):
            return tensor  # one rank: no dimension added (Lightning's documented contract)
        if sync_grads:
            return ops.all_gather_with_grads(tensor, group=group)
        return ops.all_gather(tensor, group=group)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        if isinstance(obj, Tensor):
            return ops.broadcast_tensor(obj.to(self.root_device), src=src)
        device = self.root_device if self.root_device.type == "cuda" else None
        return ops.broadcast_object(obj, src=src, device=device)

    def barrier(self, name: Optional[str] = None) -> None:
        if self.distributed:
            ops.barrier(name=name, device_ids=self._device_ids())

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not self.distributed:
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)
        total = ops.all_reduce(flag, reduce_op="sum")
        return bool(total == self.world_size) if all else bool(total > 0)
