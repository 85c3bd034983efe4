"""The process group that DDP, FSDP2 and model parallelism share: backend choice, timeout, rendezvous."""
from __future__ import annotations

import atexit
import os
import time
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from . import rendezvous_rounds
from .start_methods import PROCESS_GROUP_START_METHODS, StartMethod, check_start_method

DEFAULT_TIMEOUT = timedelta(minutes=30)


class ProcessGroupMixin:
    """For a parallel strategy whose ranks join one ``torch.distributed`` process group in
    :meth:`setup_environment`. Its ``__init__`` calls :meth:`_keep_process_group_settings`."""

    def _keep_process_group_settings(
        self, process_group_backend: Optional[str], timeout: Optional[timedelta], start_method: StartMethod
    ) -> None:
        check_start_method(start_method, PROCESS_GROUP_START_METHODS)
        self.start_method = start_method
        self._process_group_backend = process_group_backend
        self._timeout = timeout if timeout is not None else DEFAULT_TIMEOUT

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
        rendezvous_rounds.install()  # a forked rank got the launcher's variables after importing this package
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
