"""``ModelParallelStrategy``: your ``parallelize_fn(model, device_mesh)`` applies tensor parallelism
and/or ``fully_shard`` on a 2-D device mesh.

>>> def parallelize(model, mesh):
...     parallelize_module(model, mesh["tensor_parallel"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
...     return model
>>> strategy = ModelParallelStrategy(parallelize, data_parallel_size=1, tensor_parallel_size=2)
>>> fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)  # doctest: +SKIP

The mesh has two named dimensions, ``"data_parallel"`` (outer) and ``"tensor_parallel"`` (inner).
By default the tensor-parallel size is the number of devices per node and the data-parallel size
the number of nodes.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import nn

from ..accelerators import Accelerator
from ..environments.base import ClusterEnvironment
from .start_methods import StartMethod
from ..precision import Precision
from .dtensor import DTensorStrategy


class ModelParallelStrategy(DTensorStrategy):
    """Tensor (and data) parallelism on a 2-D device mesh: ``parallelize_fn(model, device_mesh)``
    shards the model (``parallelize_module`` over ``device_mesh["tensor_parallel"]``, ``fully_shard``
    over ``device_mesh["data_parallel"]``) and returns it.

    ``save_distributed_checkpoint=True`` saves a sharded directory; ``False`` one full file on rank 0.
    """

    def __init__(
        self,
        parallelize_fn: Optional[Callable[[nn.Module, Any], nn.Module]] = None,
        data_parallel_size: Union[str, int] = "auto",
        tensor_parallel_size: Union[str, int] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
        start_method: StartMethod = "popen",
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision=precision if precision is not None else precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
        )  # fmt: skip
        if not callable(parallelize_fn):
            raise ValueError(
                "ModelParallelStrategy needs your parallelize function: Fabric(strategy=ModelParallelStrategy("
                "parallelize_fn=fn)), where fn(model, device_mesh) applies parallelize_module/fully_shard and"
                " returns the model"
            )
        for name, size in (("data_parallel_size", data_parallel_size), ("tensor_parallel_size", tensor_parallel_size)):
            if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"{name}={size!r} must be 'auto' or a positive integer")
        self._parallelize_fn = parallelize_fn
        self._dp_size = data_parallel_size
        self._tp_size = tensor_parallel_size
        self.save_distributed_checkpoint = save_distributed_checkpoint
        self._mesh: Any = None

    @property
    def data_parallel_size(self) -> int:
        if self._dp_size != "auto":
            return int(self._dp_size)
        return self.num_nodes if self._tp_size == "auto" else max(1, self.world_size // int(self._tp_size))

    @property
    def tensor_parallel_size(self) -> int:
        if self._tp_size != "auto":
            return int(self._tp_size)
        return self.num_processes if self._dp_size == "auto" else max(1, self.world_size // int(self._dp_size))

    @property
    def _save_sharded(self) -> bool:
        return self.save_distributed_checkpoint

    @property
    def device_mesh(self) -> Any:
        """The ``("data_parallel", "tensor_parallel")`` mesh (once the ranks have started)."""
        if self._mesh is None:
            self._require_process_group("the device mesh")
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.data_parallel_size, self.tensor_parallel_size)
            names = ("data_parallel", "tensor_parallel")
            self._mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        return self._mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """Ranks of one tensor-parallel group read the same batches: shard data over the data-parallel dimension."""
        return {"num_replicas": self.data_parallel_size, "rank": self.global_rank // self.tensor_parallel_size}

    def configure(self, num_nodes: int) -> None:
        super().configure(num_nodes)
        if self.data_parallel_size * self.tensor_parallel_size != self.world_size:
            raise ValueError(
                f"data_parallel_size={self.data_parallel_size} x tensor_parallel_size={self.tensor_parallel_size}"
                f" must equal the number of ranks ({self.world_size}): change the sizes or devices/num_nodes"
            )

    def setup_environment(self) -> None:
        super().setup_environment()
        self.device_mesh  # noqa: B018 - every rank builds the mesh's groups now, together

    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule

        before = self._parameters_by_name(module)
        parallel = self._parallelize_fn(module, self.device_mesh)
        if not isinstance(parallel, nn.Module):
            raise TypeError(f"parallelize_fn must return the model, got {type(parallel).__name__}")
        if self.data_parallel_size > 1 and not any(isinstance(m, FSDPModule) for m in parallel.modules()):
            raise RuntimeError(
                f"data_parallel_size={self.data_parallel_size}, but parallelize_fn did not apply fully_shard, so the"
                " data-parallel ranks would never average their gradients: call"
                " fully_shard(model, mesh=device_mesh['data_parallel']) in it"
            )
        return self._finish_module(parallel, before, device=self.root_device)

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        return self._gradient_sync_off(module, enabled)

    def __repr__(self) -> str:
        return f"ModelParallelStrategy(data_parallel_size={self._dp_size}, tensor_parallel_size={self._tp_size})"




def register_strategies(registry: Any) -> None:
    """Register ``"model_parallel"`` (built by name, it says to pass ``ModelParallelStrategy(parallelize_fn=...)``)."""
    registry.register(
        "model_parallel", ModelParallelStrategy, "tensor + data parallelism on a 2-D device mesh", start_method="popen"
    )
