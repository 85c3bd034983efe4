"""DistributedDataParallel: one process per device, gradients all-reduced during backward."""
from __future__ import annotations

import atexit
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..accelerators import Accelerator
from ..environments.base import ClusterEnvironment
from ..launching.start_methods import PROCESS_GROUP_START_METHODS, StartMethod, check_start_method
from ..precision import Precision
from .parallel import ParallelStrategy

DEFAULT_TIMEOUT = timedelta(minutes=30)


class DDPStrategy(ParallelStrategy):
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
        check_start_method(start_method, PROCESS_GROUP_START_METHODS)
        if model_averaging_period is not None:
            raise ValueError("model_averaging_period (post-local SGD) is not supported by DDPStrategy yet")
        self.start_method = start_method
        self._process_group_backend = process_group_backend
        self._timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        self._ddp_comm_state = ddp_comm_state
        self._ddp_comm_hook = ddp_comm_hook
        self._ddp_comm_wrapper = ddp_comm_wrapper
        self._ddp_kwargs = kwargs

    @property
    def process_group_backend(self) -> str:
        if self._process_group_backend is not None:
            return self._process_group_backend
        if self.accelerator is not None:
            return self.accelerator.distributed_backend
        return "nccl" if self.root_device.type == "cuda" else "gloo"

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    def setup_environment(self) -> None:
        super().setup_environment()
        self.setup_distributed()

    def setup_distributed(self) -> None:
        """Join the process group (once per process)."""
        if dist.is_initialized():
            return
        environment = self.cluster_environment
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        kwargs: dict[str, Any] = {}
        if self.root_device.type == "cuda":
            kwargs["device_id"] = self.root_device
        dist.init_process_group(
            self.process_group_backend,
            init_method="env://",
            rank=self.global_rank,
            world_size=self.world_size,
            timeout=self._timeout,
            **kwargs,
        )
        # a rank that exits with its group alive can abort in torch's C++ teardown (SIGABRT at exit)
        atexit.register(_destroy_process_group)

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
        """Kept for API parity: DDP is configured in :meth:`setup_module`."""

    def teardown(self) -> None:
        super().teardown()

    def __repr__(self) -> str:
        return f"DDPStrategy(backend={self._process_group_backend or 'auto'}, start_method={self.start_method})"


# How long the exit handler releases the GIL so gloo's worker threads can drop their last work.
_WORKER_DRAIN_S = 0.1


def _destroy_process_group() -> None:
    """Destroy the group at exit, while the interpreter is still whole.

    A gloo worker thread frees a finished collective's tensors just after the caller's ``wait()``
    returns; freeing them takes the GIL. A script whose last line is a collective can reach
    interpreter finalisation before that thread got the GIL, and the thread then aborts the process
    (``terminate called without an active exception``, SIGABRT, seen about once in 20 runs). Sleeping
    briefly here hands the GIL over; DDP modules keep the backend (and its threads) alive past
    ``destroy_process_group``, so the destroy alone does not stop them.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(_WORKER_DRAIN_S)
