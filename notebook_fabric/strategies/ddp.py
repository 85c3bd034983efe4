"""DistributedDataParallel: one process per device, gradients all-reduced during backward."""
from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..accelerators import Accelerator
from ..environments.base import ClusterEnvironment
from .start_methods import StartMethod
from ..precision import Precision
from .parallel import ParallelStrategy
from .process_group import DEFAULT_TIMEOUT, ProcessGroupMixin


class DDPStrategy(ProcessGroupMixin, ParallelStrategy):
    """DDP over gloo (CPU) or nccl (CUDA). ``start_method`` says how ranks start: ``"popen"`` re-runs
    the script (``strategy="ddp"``), ``"spawn"``/``"fork"``/``"forkserver"`` run a function
    (``ddp_spawn``, ``ddp_fork``/``ddp_notebook``). Extra keyword arguments go to
    ``DistributedDataParallel`` (e.g. ``find_unused_parameters=True``).

    >>> DDPStrategy(process_group_backend="gloo", timeout=timedelta(minutes=5), gradient_as_bucket_view=True)
    DDPStrategy(backend=gloo, start_method=popen)
    """

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        ddp_comm_state: Optional[object] = None,
        ddp_comm_hook: Optional[Callable] = None,
        ddp_comm_wrapper: Optional[Callable] = None,
        model_averaging_period: Optional[int] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = DEFAULT_TIMEOUT,
        start_method: StartMethod = "popen",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
        )
        self._keep_process_group_settings(process_group_backend, timeout, start_method)
        if model_averaging_period is not None:
            raise ValueError("model_averaging_period (post-local SGD) is not supported by DDPStrategy yet")
        self._ddp_comm_state = ddp_comm_state
        self._ddp_comm_hook = ddp_comm_hook
        self._ddp_comm_wrapper = ddp_comm_wrapper
        self._ddp_kwargs = kwargs

    def setup_module(self, module: nn.Module) -> nn.Module:
        device_ids = self._device_ids()
        ddp = DistributedDataParallel(module, device_ids=device_ids, **self._ddp_kwargs)
        if self._ddp_comm_hook is not None:
            hook = self._ddp_comm_hook
            if self._ddp_comm_wrapper is not None:
                hook = self._ddp_comm_wrapper(hook)
            ddp.register_comm_hook(state=self._ddp_comm_state, hook=hook)
        return ddp

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        if not enabled:
            return nullcontext()
        if not isinstance(module, DistributedDataParallel):
            raise TypeError(
                "no_backward_sync needs the model returned by fabric.setup() (a DDP-wrapped module),"
                f" got {type(module).__name__}"
            )
        return module.no_sync()

    def configure_ddp(self) -> None:
        """Does nothing: DDP is configured in :meth:`setup_module`. Kept because the strategy interface
        of the spec lists it."""

    def __repr__(self) -> str:
        return f"DDPStrategy(backend={self._process_group_backend or 'auto'}, start_method={self.start_method})"
