"""The strategy interface: how models, optimizers, data and collectives are spread over devices.

A strategy never starts processes: it says how its ranks must start (``start_method``) and a
launcher of ``launching/`` (picked by :func:`notebook_fabric.launching.launchers.select_launcher`) does it.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..accelerators import Accelerator
from ..checkpoint import io as checkpoint_io
from ..checkpoint import state as checkpoint_state
from .start_methods import StartMethod
from ..precision import Precision
from ..utilities.init import SkipInitialization


class Strategy:
    """A single process on one device; parallel strategies override the distributed parts.

    Subclass it for a custom strategy and register it::

        class Quiet(Strategy):
            def reduce(self, tensor, *args, **kwargs):
                return tensor
        STRATEGY_REGISTRY.register("quiet", Quiet)
        fabric = Fabric(strategy="quiet")
    """

    #: how the ranks of this strategy come to exist: None (this process only) or a name of the start-method
    #: table (:mod:`notebook_fabric.strategies.start_methods`), which also says who starts them
    start_method: Optional[StartMethod] = None
    #: whether ``Fabric.init_module(empty_init=None)`` should create parameters on the meta device
    shards_parameters: bool = False
    #: whether ``setup_module`` hooks into the module in place (FSDP2, tensor parallel) rather than returning
    #: a wrapper: either way, ``model.training_step(...)`` must run through the wrapped forward
    hooks_module: bool = False

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
    ) -> None:
        self._accelerator = accelerator
        self._checkpoint_io = checkpoint_io
        self._precision = self.adapt_precision(precision) if precision is not None else None
        self._root_device: Optional[torch.device] = None

    # ----- wiring (the connector fills these in) -------------------------------------------------
    @property
    def accelerator(self) -> Optional[Accelerator]:
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator: Accelerator) -> None:
        self._accelerator = accelerator

    @property
    def precision(self) -> Precision:
        if self._precision is None:
            self._precision = self.adapt_precision(Precision())
        return self._precision

    @precision.setter
    def precision(self, precision: Precision) -> None:
        self._precision = self.adapt_precision(precision)

    def adapt_precision(self, precision: Precision) -> Precision:
        """The plugin this strategy runs for ``precision``: check it, or swap in the strategy's own kind."""
        return precision

    @property
    def checkpoint_io(self) -> Any:
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        self._checkpoint_io = io

    @property
    def root_device(self) -> torch.device:
        return self._root_device if self._root_device is not None else torch.device("cpu")

    @root_device.setter
    def root_device(self, device: torch.device) -> None:
        self._root_device = device

    # ----- the job's shape -----------------------------------------------------------------------
    cluster_environment: Any = None

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def node_rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def num_processes(self) -> int:
        return 1

    @property
    def num_nodes(self) -> int:
        return 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed_sampler_kwargs(self) -> Optional[dict[str, int]]:
        """``num_replicas`` and ``rank`` for a DistributedSampler, or None where data is not sharded."""
        return None

    def configure(self, num_nodes: int) -> None:
        """Called once by the connector after the accelerator, devices and environment are set."""

    # ----- lifecycle -----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """Prepare this process: select the device, join the process group where there is one."""
        if self.accelerator is not None:
            self.accelerator.setup_device(self.root_device)

    def teardown(self) -> None:
        self.precision.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()

    # ----- models and optimizers -----------------------------------------------------------------
    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        module = self.setup_module(module)
        return module, [self.setup_optimizer(optimizer) for optimizer in optimizers]

    def setup_module(self, module: nn.Module) -> nn.Module:
        return module

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def process_dataloader(self, dataloader: Any) -> Any:
        """A last look at each DataLoader ``setup_dataloaders`` prepares (DeepSpeed reads its batch size)."""
        return dataloader

    def module_to_device(self, module: nn.Module) -> None:
        module.to(self.root_device)

    def tensor_init_context(self) -> ContextManager:
        stack = ExitStack()
        if self.root_device.type != "cpu":
            stack.enter_context(self.root_device)
        stack.enter_context(self.precision.tensor_init_context())
        return stack

    def module_init_context(self, empty_init: Optional[bool] = None) -> ContextManager:
        """Modules built inside land on the device in the precision's dtype. A sharding strategy builds them
        on the meta device (unless ``empty_init=False``); elsewhere ``empty_init=True`` allocates the memory
        but skips the ``torch.nn.init`` calls (load a checkpoint into the model next)."""
        stack = ExitStack()
        if self.shards_parameters and empty_init is not False:
            stack.enter_context(torch.device("meta"))
        else:
            if self.root_device.type != "cpu":
                stack.enter_context(self.root_device)
            if empty_init:
                stack.enter_context(SkipInitialization())
        stack.enter_context(self.precision.module_init_context())
        return stack

    def backward(self, tensor: Tensor, module: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        tensor = self.precision.pre_backward(tensor, module)
        self.precision.backward(tensor, module, *args, **kwargs)
        self.precision.post_backward(tensor, module)

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return self.precision.optimizer_step(optimizer, **kwargs)

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        """A context that skips gradient synchronisation, or None where the strategy has none to skip."""
        return nullcontext()

    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: Union[float, int],
        norm_type: Union[float, int, str] = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        # the scaler tracks the optimizer that steps (the unwrapped one), not Fabric's wrapper
        self.precision.unscale_gradients(checkpoint_state.unwrap_optimizer(optimizer))
        parameters = _parameters_with_grad(optimizer)
        return torch.nn.utils.clip_grad_norm_(
            parameters, max_norm=max_norm, norm_type=float(norm_type), error_if_nonfinite=error_if_nonfinite
        )

    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: Union[float, int]) -> None:
        self.precision.unscale_gradients(checkpoint_state.unwrap_optimizer(optimizer))
        torch.nn.utils.clip_grad_value_(_parameters_with_grad(optimizer), clip_value=clip_val)

    # ----- collectives (single process: identity) ------------------------------------------------
    def reduce(self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Tensor:
        """Reduce ``tensor`` over the ranks; the input tensor is never modified."""
        return tensor

    def all_reduce(self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Tensor:
        return self.reduce(tensor, group=group, reduce_op=reduce_op)

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """Every rank's ``tensor`` stacked on a new first dimension; on one process, ``tensor`` itself."""
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self, name: Optional[str] = None) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision

    # ----- checkpoints ---------------------------------------------------------------------------
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return checkpoint_state.unwrap_module(module).state_dict()

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        checkpoint_state.unwrap_module(module).load_state_dict(state_dict, strict=strict)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return checkpoint_state.unwrap_optimizer(optimizer).state_dict()

    def load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        checkpoint_state.unwrap_optimizer(optimizer).load_state_dict(state)

    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Optional[Any] = None,
        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None,
    ) -> None:
        """Rank 0 writes ``state`` atomically; every rank waits until the file is complete."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        if self.is_global_zero:
            payload = checkpoint_state.to_saveable(self, state, filter)
            if self.checkpoint_io is not None:
                self.checkpoint_io.save_checkpoint(payload, path)
            else:
                checkpoint_io.atomic_save(payload, path)
        self.barrier("save_checkpoint")

    def load_checkpoint(
        self, path: Any, state: Optional[Union[nn.Module, Optimizer, dict[str, Any]]] = None, strict: bool = True,
        weights_only: bool = False,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from ``path`` and return what the file holds beyond it.

        ``weights_only=True`` unpickles only tensors and plain containers (a file from elsewhere)."""
        self.barrier("load_checkpoint")
        if self.checkpoint_io is not None:
            checkpoint = self.checkpoint_io.load_checkpoint(path)
        else:
            checkpoint = checkpoint_io.load(path, map_location="cpu", weights_only=weights_only)
        if state is None:
            return checkpoint
        return checkpoint_state.restore(self, state, checkpoint, strict=strict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.root_device})"


def _parameters_with_grad(optimizer: Optimizer) -> list[Tensor]:
    optimizer = checkpoint_state.unwrap_optimizer(optimizer)
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
