"""XLA (TPU, or XLA on other devices) through torch_xla, an optional extra: ``pip install 'notebook-fabric[xla]'``.

torch-xla pins its own torch version, so it lives in an environment built around it (not beside
any torch). Nothing here imports ``torch_xla`` until a strategy is used in a rank; every constructor
first checks that it is installed.

XLA ranks are started by torch_xla's own launcher (``xmp.spawn``): these strategies declare
``start_method = "xla"`` and :mod:`notebook_fabric.launching.xla_ranks` runs a function on every rank.
On a TPU that is one process per chip; on torch_xla's CPU device, threads of one process. What the
CPU device needs beyond a TPU lives in :mod:`.xla_devices` (``self._ranks``), nowhere else.
Gradients are all-reduced in the optimizer step (``xm.reduce_gradients``), as torch_xla does, and
``mark_step()`` cuts the lazy graph (call it once per training step when you do not iterate a
dataloader set up by Fabric).
"""
from __future__ import annotations

import functools
import os
import pickle
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..accelerators import Accelerator
from ..accelerators.xla import xla_available
from ..checkpoint import io as checkpoint_io
from ..checkpoint import state as checkpoint_state
from ..collectives.ops import normalize_reduce_op
from ..collectives.trace import run_traced
from ..environments.base import ClusterEnvironment
from ..precision import Precision
from ..utilities.apply import tensors_to_cpu
from .parallel import ParallelStrategy
from .single_device import SingleDeviceStrategy
from .xla_devices import ProcessRanks, ranks_for

INSTALL_HINT = (
    "pip install 'notebook-fabric[xla]' (torch-xla pins its own torch version: install it into an environment"
    " built for it, e.g. a fresh venv with pip install torch==2.9.0 torch-xla==2.9.0; scripts/xla_env.sh builds one)"
)
#: the precisions XLA runs: bf16 autocast or whole-model half dtypes (no float16 loss scaling on XLA)
XLA_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
#: our reduce_op names -> torch_xla's reduce types (mean is a sum divided by the world size)
XLA_REDUCE_TYPES = {"sum": "sum", "mean": "sum", "max": "max", "min": "min", "product": "mul"}


def require_xla(what: str) -> None:
    if not xla_available():
        raise ImportError(f"{what} needs torch_xla, which is not installed: {INSTALL_HINT}")


def xla_reduce_type(reduce_op: Any) -> tuple[str, bool]:
    """``(torch_xla reduce type, divide by world size afterwards)`` for a ``reduce_op`` name or ReduceOp."""
    name, _ = normalize_reduce_op(reduce_op)
    if name not in XLA_REDUCE_TYPES:
        raise ValueError(f"reduce_op={reduce_op!r} is not supported on XLA; choose one of {sorted(XLA_REDUCE_TYPES)}")
    return XLA_REDUCE_TYPES[name], name == "mean"


def check_xla_precision(precision: Precision) -> Precision:
    """``precision`` if XLA can run it, else ``ValueError`` listing what it can."""
    name = getattr(precision, "precision", None)
    if name not in XLA_PRECISIONS:
        raise ValueError(
            f"XLA strategies run precision= one of {list(XLA_PRECISIONS)}, not {name!r}"
            " ('16-mixed' needs a loss scaler XLA does not have: use 'bf16-mixed')."
        )
    return precision


def _xm() -> Any:
    import torch_xla.core.xla_model as xm

    return xm


def mark_step() -> None:
    """Cut the lazy XLA graph here and run it (``torch_xla.sync()``, formerly ``xm.mark_step()``)."""
    import torch_xla

    sync = getattr(torch_xla, "sync", None)
    if callable(sync):
        sync()
    else:
        _xm().mark_step()


def move_to_xla(module: nn.Module, device: torch.device) -> dict[int, Tensor]:
    """``module.to(device)``, returning ``{id(parameter before): parameter after}``.

    Moving from the CPU to an XLA device replaces each parameter with a new one (the two tensor
    types cannot share a shallow copy), so an optimizer built before the move holds the CPU ones."""
    before = list(module.parameters())
    module.to(device)
    return {id(old): new for old, new in zip(before, module.parameters()) if old is not new}


def relink_optimizer(optimizer: Optimizer, moved: dict[int, Tensor]) -> Optimizer:
    """Point ``optimizer``'s parameter groups (and state) at the parameters :func:`move_to_xla` made."""
    if moved:
        for group in optimizer.param_groups:
            group["params"] = [moved.get(id(p), p) for p in group["params"]]
        for old_id, new in moved.items():
            for key in [k for k in optimizer.state if id(k) == old_id]:
                optimizer.state[new] = optimizer.state.pop(key)
    return optimizer


def _traced(op: str, meta: Callable[[], dict], call: Callable[[], Any]) -> Any:
    return run_traced(op, call, meta)


def _tensor_meta(tensor: Tensor, world_size: int, **extra: Any) -> Callable[[], dict]:
    return lambda: {"group_size": world_size, "shapes": [tuple(tensor.shape)], "dtypes": [str(tensor.dtype)], **extra}


class XLAEnvironment(ClusterEnvironment):
    """Ranks as torch_xla's runtime numbers them (inside processes ``xmp.spawn`` started)."""

    @property
    def creates_processes_externally(self) -> bool:
        return False

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", -1))

    @staticmethod
    def detect() -> bool:
        return False  # only XLA strategies use it, and they bring it themselves

    def world_size(self) -> int:
        import torch_xla.runtime as xr

        return int(xr.world_size())

    def set_world_size(self, size: int) -> None:
        pass  # the runtime decides

    def global_rank(self) -> int:
        import torch_xla.runtime as xr

        return int(xr.global_ordinal())

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        import torch_xla.runtime as xr

        return int(xr.local_ordinal())

    def node_rank(self) -> int:
        import torch_xla.runtime as xr

        return int(xr.host_index())


class XLAStrategy(ParallelStrategy):
    """Data parallel over XLA devices, started by ``xmp.spawn``: one process per TPU chip, or one
    thread per device of torch_xla's CPU device (``PJRT_DEVICE=CPU``).

    ``sync_module_states`` broadcasts rank 0's parameters at setup; ``debug`` turns on torch_xla's
    debug output (``PT_XLA_DEBUG_LEVEL=2``).
    """

    start_method = "xla"

    def __init__(
        self,
        sync_module_states: bool = True,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        debug: bool = False,
        accelerator: Optional[Accelerator] = None,
        **kwargs: Any,
    ) -> None:
        require_xla(type(self).__name__)
        if "precision_plugin" in kwargs:  # the spec's name for it
            precision = kwargs.pop("precision_plugin")
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown arguments {sorted(kwargs)}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment or XLAEnvironment(),
            checkpoint_io=checkpoint_io,
            precision=precision,
        )
        self.sync_module_states = sync_module_states
        self.debug = debug
        self._launched = False
        self._reduced: set[int] = set()  # optimizers whose gradients were already all-reduced this step
        self._device_ranks: Optional[ProcessRanks] = None

    @property
    def _ranks(self) -> ProcessRanks:
        """How the ranks run on this device kind (threads on XLA:CPU: see :mod:`.xla_devices`)."""
        if self._device_ranks is None:
            self._device_ranks = ranks_for()
        return self._device_ranks

    def launch_environment(self) -> dict[str, str]:
        """Variables the launcher sets before torch_xla starts this strategy's ranks."""
        return self._ranks.launch_environment(self.num_processes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_device_ranks"] = None  # a process-wide object: each rank looks its own up
        return state

    # ----- the job's shape (the runtime's numbers once the ranks run) -----------------------------
    def adapt_precision(self, precision: Precision) -> Precision:
        return check_xla_precision(precision)

    @property
    def root_device(self) -> torch.device:
        if not self._launched:
            raise RuntimeError(
                "The XLA device of a rank exists only inside the ranks: call fabric.launch(train_fn) first"
                " (torch_xla must not be initialised in the process that starts them)."
            )
        import torch_xla

        return torch_xla.device()

    @root_device.setter
    def root_device(self, device: torch.device) -> None:
        self._root_device = device

    @property
    def global_rank(self) -> int:
        return self.cluster_environment.global_rank() if self._launched else 0

    @property
    def local_rank(self) -> int:
        return self.cluster_environment.local_rank() if self._launched else 0

    @property
    def node_rank(self) -> int:
        return self.cluster_environment.node_rank() if self._launched else 0

    @property
    def world_size(self) -> int:
        return self.cluster_environment.world_size() if self._launched else self.num_processes * self.num_nodes

    @property
    def distributed(self) -> bool:
        return self._launched and self.world_size > 1

    def setup_environment(self) -> None:
        if self.debug:
            os.environ.setdefault("PT_XLA_DEBUG_LEVEL", "2")
        self._launched = True
        if self.accelerator is not None:
            self.accelerator.setup_device(self.root_device)
        from ..collectives.debug import provide_check_channel

        rank, world_size = self.global_rank, self.world_size
        provide_check_channel(lambda: self._ranks.check_channel(rank, world_size))  # used by debug=True only

    def teardown(self) -> None:
        self._launched = False
        super().teardown()

    # ----- models and optimizers -----------------------------------------------------------------
    def setup_module(self, module: nn.Module) -> nn.Module:
        self._broadcast_initial_states(module)
        return module

    def _broadcast_initial_states(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (with ``sync_module_states``, and always where
        the ranks share one random generator and so did not build the same model)."""
        if (self.sync_module_states or self._ranks.broadcast_initial_states) and self.distributed:
            tensors = [*module.parameters(), *module.buffers()]
            _traced("broadcast", lambda: {"group_size": self.world_size, "shapes": [tuple(t.shape) for t in tensors],
                                          "dtypes": [str(t.dtype) for t in tensors], "src": 0},
                    lambda: self._ranks.share_initial_states(tensors, 0))  # fmt: skip

    def module_to_device(self, module: nn.Module) -> None:
        self._moved = move_to_xla(module, self.root_device)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return relink_optimizer(optimizer, getattr(self, "_moved", {}))

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        return nullcontext()  # gradients are reduced in optimizer_step, never during backward

    def backward(self, tensor: Tensor, module: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        super().backward(tensor, module, *args, **kwargs)
        self._ranks.settle()

    def reduce_gradients(self, optimizer: Optimizer) -> None:
        """All-reduce (average) the gradients of ``optimizer``'s parameters, once per step."""
        optimizer = checkpoint_state.unwrap_optimizer(optimizer)
        if id(optimizer) in self._reduced or not self.distributed:
            return
        _traced("reduce_gradients", lambda: {"group_size": self.world_size, "shapes": [], "dtypes": []},
                lambda: self._ranks.reduce_gradients(optimizer, self.world_size))  # fmt: skip
        self._ranks.settle()
        self._reduced.add(id(optimizer))

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        self.reduce_gradients(optimizer)
        self._reduced.discard(id(checkpoint_state.unwrap_optimizer(optimizer)))
        result = self.precision.optimizer_step(optimizer, **kwargs)
        self._ranks.settle()
        return result

    def clip_gradients_norm(self, module: nn.Module, optimizer: Optimizer, max_norm: Union[float, int],
                            norm_type: Union[float, int, str] = 2.0, error_if_nonfinite: bool = True) -> Tensor:  # fmt: skip
        self.reduce_gradients(optimizer)  # clip what the step will apply, not this rank's share
        return super().clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)

    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: Union[float, int]) -> None:
        self.reduce_gradients(optimizer)
        super().clip_gradients_value(module, optimizer, clip_val)

    def mark_step(self) -> None:
        """Cut the lazy graph: everything recorded since the last step compiles (once) and runs."""
        self._ranks.sync()

    # ----- collectives ---------------------------------------------------------------------------
    def reduce(self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Tensor:
        reduce_type, divide = xla_reduce_type(reduce_op)  # the same error on one process as on many
        if not self.distributed:
            return tensor
        _no_groups(group)
        tensor = self._ranks.collective_input(tensor, self.root_device)
        result = _traced("all_reduce", _tensor_meta(tensor, self.world_size, reduce_op=reduce_type),
                         lambda: self._ranks.issue(_xm().all_reduce, reduce_type, tensor, pin_layout=self._ranks.pin_layout))  # fmt: skip
        self._ranks.settle()
        return result / self.world_size if divide else result

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if not self.distributed:
            return tensor  # one process: no dimension added (Lightning's contract)
        _no_groups(group)
        tensor = self._ranks.collective_input(tensor, self.root_device)
        stacked = tensor.unsqueeze(0)
        if sync_grads:
            import torch_xla.core.functions as xf

            gather = functools.partial(self._ranks.issue, xf.all_gather, stacked, dim=0)
        else:
            gather = functools.partial(self._ranks.issue, _xm().all_gather, stacked.detach(), dim=0,
                                       pin_layout=self._ranks.pin_layout)
        result = _traced("all_gather", _tensor_meta(tensor, self.world_size), gather)
        self._ranks.settle()
        return result

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        if isinstance(obj, Tensor):
            tensor = self._ranks.collective_input(obj, self.root_device).clone()
            _traced("broadcast", _tensor_meta(tensor, self.world_size, src=src),
                    lambda: self._ranks.broadcast_([tensor], src))  # fmt: skip
            self._ranks.settle()
            return tensor
        # any picklable object: its length first, then its bytes (every rank must build the same graph)
        payload = pickle.dumps(obj) if self.global_rank == src else b""
        length = self.broadcast(torch.tensor([len(payload)], dtype=torch.int32), src=src)
        buffer = torch.zeros(int(length.item()), dtype=torch.int32)
        if self.global_rank == src:
            buffer = torch.tensor(list(payload), dtype=torch.int32)
        received = self.broadcast(buffer, src=src).cpu()
        return pickle.loads(bytes(received.to(torch.uint8).tolist()))

    def barrier(self, name: Optional[str] = None) -> None:
        if self.distributed:
            tag = name or "barrier"
            _traced("barrier", lambda: {"group_size": self.world_size, "shapes": [], "dtypes": [], "name": tag},
                    lambda: self._barrier())  # fmt: skip

    def _barrier(self) -> None:
        """Every rank's pending work dispatched, then a one-element all-reduce that every rank must join
        (torch_xla's ``rendezvous`` syncs the graph in each rank at once, which XLA:CPU cannot take)."""
        self._ranks.sync()
        token = self._ranks.issue(_xm().all_reduce, "sum", torch.ones(1).to(self.root_device), pin_layout=self._ranks.pin_layout)
        self._ranks.sync()
        token.cpu()

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not self.distributed:
            return decision
        total = self.reduce(torch.tensor([int(decision)], dtype=torch.int32), reduce_op="sum")  # data, not a constant
        return bool(total == self.world_size) if all else bool(total > 0)

    # ----- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:  # fmt: skip
        """Rank 0 writes ``state`` (moved to the CPU) atomically; every rank waits for it."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        self._ranks.sync()  # materialise what the state depends on, on every rank alike
        if self.is_global_zero:
            payload = tensors_to_cpu(checkpoint_state.to_saveable(self, state, filter))
            if self.checkpoint_io is not None:
                self.checkpoint_io.save_checkpoint(payload, path)
            else:
                checkpoint_io.atomic_save(payload, path)
        self.barrier("save_checkpoint")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(devices={self.num_processes}, launched={self._launched})"


class SingleDeviceXLAStrategy(SingleDeviceStrategy):
    """One XLA device (a TPU core, or XLA on one GPU) in this process; no processes to start."""

    def __init__(
        self,
        device: Optional[Union[str, torch.device]] = None,
        accelerator: Optional[Accelerator] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        **kwargs: Any,
    ) -> None:
        require_xla(type(self).__name__)
        if "precision_plugin" in kwargs:
            precision = kwargs.pop("precision_plugin")
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown arguments {sorted(kwargs)}")
        if isinstance(device, int):
            device = torch.device("xla", device)
        super().__init__(device=device, accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision=precision)  # fmt: skip

    def adapt_precision(self, precision: Precision) -> Precision:
        return check_xla_precision(precision)

    @property
    def root_device(self) -> torch.device:
        import torch_xla  # registers the XLA backend with torch

        if self._root_device is not None and self._root_device.type == "xla":
            return self._root_device
        return torch_xla.device()

    @root_device.setter
    def root_device(self, device: torch.device) -> None:
        self._root_device = device

    def mark_step(self) -> None:
        """Cut the lazy graph: everything recorded since the last step compiles (once) and runs."""
        mark_step()

    def module_to_device(self, module: nn.Module) -> None:
        self._moved = move_to_xla(module, self.root_device)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return relink_optimizer(optimizer, getattr(self, "_moved", {}))

    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:  # fmt: skip
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        mark_step()
        payload = tensors_to_cpu(checkpoint_state.to_saveable(self, state, filter))
        if self.checkpoint_io is not None:
            self.checkpoint_io.save_checkpoint(payload, path)
        else:
            checkpoint_io.atomic_save(payload, path)


def _no_groups(group: Any) -> None:
    if group is not None:
        raise ValueError("XLA collectives here run over all ranks; group= is not supported")


def register_strategies(registry: Any) -> None:
    """Register the XLA names (importable without torch_xla; building one needs it)."""
    registry.register("xla", XLAStrategy, "data parallel over XLA devices (TPU cores), ranks from xmp.spawn",
)  # fmt: skip
    registry.register("xla_debug", XLAStrategy, "XLAStrategy with torch_xla's debug output", debug=True)
    registry.register("single_xla", SingleDeviceXLAStrategy, "one XLA device in this process")
    from .xla_fsdp import XLAFSDPStrategy

    registry.register("xla_fsdp", XLAFSDPStrategy, "torch_xla FullyShardedDataParallel over XLA devices")


__all__ = [
    "XLAStrategy",
    "SingleDeviceXLAStrategy",
    "XLAEnvironment",
    "check_xla_precision",
    "xla_reduce_type",
    "register_strategies",
]
