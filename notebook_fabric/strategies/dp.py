"""torch.nn.DataParallel: one process driving several GPUs (CUDA only)."""
from __future__ import annotations

from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn

from ..accelerators import Accelerator
from ..precision import Precision
from ..utilities.apply import apply_to_collection
from .parallel import ParallelStrategy


class DataParallelStrategy(ParallelStrategy):
    """Split each batch over ``parallel_devices`` inside one process. Prefer DDP; this exists for parity."""

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, checkpoint_io=checkpoint_io, precision=precision
        )

    @property
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")

    @property
    def num_processes(self) -> int:
        return 1

    @property
    def distributed_sampler_kwargs(self) -> None:
        return None

    def configure(self, num_nodes: int) -> None:
        if num_nodes != 1:
            raise ValueError("strategy='dp' runs on one node: set num_nodes=1 or use strategy='ddp'")
        devices = self.parallel_devices or []
        if any(device.type != "cuda" for device in devices):
            raise ValueError("strategy='dp' needs CUDA GPUs (accelerator='cuda'); on CPU use strategy='ddp'")

    def setup_module(self, module: nn.Module) -> nn.Module:
        return nn.DataParallel(module, device_ids=[d.index for d in self.parallel_devices])

    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        """DataParallel gathers outputs on the root device; reducing averages what was gathered."""

        def mean(t: Tensor) -> Tensor:
            return t.float().mean().to(t.dtype) if t.is_floating_point() else t.float().mean()

        return apply_to_collection(tensor, Tensor, mean) if reduce_op in (None, "mean", "avg") else tensor

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        return None
