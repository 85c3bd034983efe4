"""The shared base of strategies whose parameters are DTensors (FSDP2, model parallel).

It joins the process group the way DDP does, builds on the meta device and materialises after
sharding, rebuilds optimizers over the sharded parameters, and saves full or sharded checkpoints.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..accelerators import Accelerator
from ..checkpoint import distributed as dcp_io
from ..checkpoint import state as checkpoint_state
from ..environments.base import ClusterEnvironment
from .start_methods import StartMethod
from ..precision import Precision
from .parallel import ParallelStrategy
from .process_group import ProcessGroupMixin


class DTensorStrategy(ProcessGroupMixin, ParallelStrategy):
    """What FSDP2 and model parallelism share: DDP's process group, modules built on the meta device
    and materialised after sharding, optimizers rebuilt over the sharded parameters, gradient norms
    over DTensors, and checkpoints through torch.distributed.checkpoint (full file or sharded dir)."""

    shards_parameters = True
    hooks_module = True

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
        start_method: StartMethod = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision=precision,
        )  # fmt: skip
        self._keep_process_group_settings(process_group_backend, timeout, start_method)
        self._modules: list[nn.Module] = []  # every module set up here, for optimizers and checkpoints
        self._replaced: dict[int, tuple[weakref.ref, nn.Parameter]] = {}  # id(parameter before setup) -> after

    @property
    def _save_sharded(self) -> bool:
        raise NotImplementedError

    def _require_process_group(self, what: str) -> None:
        if not self.distributed:
            raise RuntimeError(
                f"{type(self).__name__}: {what} exists once the ranks have started: call fabric.launch() first"
            )

    # ----- modules -------------------------------------------------------------------------------
    def module_to_device(self, module: nn.Module) -> None:
        if not _has_meta(module):  # meta tensors are materialised on the device after sharding
            module.to(self.root_device)

    def _parameters_by_name(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return {dcp_io.parameter_name(name): p for name, p in module.named_parameters()}

    def _finish_module(self, module: nn.Module, before: dict[str, nn.Parameter], device: torch.device) -> nn.Module:
        """Materialise meta tensors, remember which new parameter replaced which old one, keep the module."""
        materialize(module, device)
        for name, new in self._parameters_by_name(module).items():
            old = before.get(name)
            if old is not None:
                self._replaced[id(old)] = (weakref.ref(old), new)
        self._modules.append(module)
        return module

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer over the sharded parameters: rebuilt (same class, groups and settings) when it
        was created before setup and still holds the replaced ones."""
        return rebuild_optimizer(optimizer, self._replaced, {id(p) for m in self._modules for p in m.parameters()})

    def _module_of(self, optimizer: Any) -> nn.Module:
        optimizer = checkpoint_state.unwrap_optimizer(optimizer)
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module in reversed(self._modules):
            if any(id(p) in ids for p in module.parameters()):
                return module
        raise ValueError(
            f"{type(self).__name__} cannot checkpoint this optimizer: its parameters belong to no model set up"
            " here. Pass the optimizer returned by fabric.setup(model, optimizer)."
        )

    def _gradient_sync_off(self, module: nn.Module, enabled: bool) -> ContextManager:
        from torch.distributed.fsdp import FSDPModule

        if not enabled:
            return nullcontext()
        return _no_gradient_sync([m for m in module.modules() if isinstance(m, FSDPModule)])

    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: Union[float, int],
        norm_type: Union[float, int, str] = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        """Clip to ``max_norm`` by the norm of all gradients over all ranks; return that norm (a plain tensor)."""
        optimizer = checkpoint_state.unwrap_optimizer(optimizer)
        self.precision.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        total = total_gradient_norm(params, float(norm_type), error_if_nonfinite)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ----- checkpoints ---------------------------------------------------------------------------
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """This rank's shards (DTensors); checkpoints gather or shard through :meth:`save_checkpoint`."""
        return dcp_io.model_state(module, full=False)

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load a full state dict (from any strategy) or this strategy's sharded one. Every rank calls it."""
        dcp_io.load_model_state(module, state_dict, strict=strict)

    def load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        dcp_io.load_optimizer_state(self._module_of(optimizer), optimizer, state)

    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:  # fmt: skip
        """Every rank calls it: a sharded directory (each rank writes its shards) or one full file
        (gathered to rank 0, which writes it in the layout a single-device Fabric loads)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        if self._save_sharded:
            dcp_io.save_sharded(path, state, self._module_of, filter, is_global_zero=self.is_global_zero)
        else:
            dcp_io.save_full(path, state, self._module_of, filter, self.is_global_zero, self.checkpoint_io)
        self.barrier("save_checkpoint")

    def load_checkpoint(
        self, path: Any, state: Optional[Any] = None, strict: bool = True, weights_only: bool = False
    ) -> dict[str, Any]:
        """Restore from a full file (saved by any strategy) or a sharded directory (any world size)."""
        if not dcp_io.is_sharded_checkpoint(path):
            if Path(path).is_dir():
                raise FileNotFoundError(f"{str(path)!r} is a directory without a sharded checkpoint (.metadata) in it")
            return super().load_checkpoint(path, state=state, strict=strict, weights_only=weights_only)
        if state is None:
            raise ValueError(
                f"{str(path)!r} is a sharded checkpoint: pass the objects to restore, fabric.load(path,"
                " {'model': model, 'optimizer': optimizer}), or make one file with"
                " notebook_fabric.checkpoint.distributed.consolidate(path, 'model.ckpt')"
            )
        self.barrier("load_checkpoint")
        return dcp_io.load_sharded(path, state, self._module_of, strict=strict)



# ----- helpers ---------------------------------------------------------------------------------------
def post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule, children before their parent (``module`` last)."""
    for child in module.children():
        yield from post_order(child)
    yield module


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate meta tensors on ``device`` and initialise each submodule with its ``reset_parameters``
    (or torch's private ``_reset_parameters``, e.g. ``nn.MultiheadAttention``), children first as
    when the model is built.

    A sharded parameter is initialised whole (one layer at a time) and each rank keeps its part, so
    the model equals the one a single process builds from the same seed.
    """
    if not _has_meta(module):
        return
    module.to_empty(device=device)
    missing = []
    with torch.no_grad():
        for sub in post_order(module):
            reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
            if callable(reset):
                _reset_whole(sub, reset)
            elif any(True for _ in sub.parameters(recurse=False)) or any(True for _ in sub.buffers(recurse=False)):
                missing.append(type(sub).__name__)
    if missing:
        warnings.warn(
            f"{sorted(set(missing))} were created on the meta device but have no reset_parameters(), so their"
            " tensors hold uninitialised memory: give them reset_parameters(), or create the model with"
            " fabric.init_module(empty_init=False).",
            stacklevel=3,
        )


def _reset_whole(module: nn.Module, reset: Callable[[], Any]) -> None:
    """``reset()`` on whole-sized stand-ins for the module's own sharded parameters, then keep this rank's part."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    for name, param in sharded.items():
        local = param.to_local()
        whole = torch.empty(param.shape, dtype=local.dtype, device=local.device)
        module._parameters[name] = nn.Parameter(whole, requires_grad=param.requires_grad)
    try:
        reset()
    finally:
        for name, param in sharded.items():
            whole = module._parameters[name].detach()
            module._parameters[name] = param
            mine = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)  # no messages
            param.to_local().copy_(mine.to_local())


def rebuild_optimizer(
    optimizer: Optimizer, replaced: dict[int, tuple[weakref.ref, nn.Parameter]], owned: set[int]
) -> Optimizer:
    """``optimizer`` itself when it already holds the set-up parameters, else a new one of the same class
    over them, with the same groups and settings."""
    groups, changed = [], False
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            entry = replaced.get(id(param))
            if entry is not None and entry[0]() is param:
                changed |= entry[1] is not param
                params.append(entry[1])
            elif id(param) in owned:
                params.append(param)
            else:
                raise ValueError(
                    "The optimizer holds parameters of no model set up by this strategy. Create it from the model you"
                    " pass to fabric.setup(model, optimizer), or from the model fabric.setup_module() returned."
                )
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    if not changed:
        return optimizer
    if optimizer.state:
        raise ValueError("The optimizer has already stepped: set it up with fabric.setup() before the first step")
    if any("initial_lr" in group for group in optimizer.param_groups):
        warnings.warn(
            "A learning-rate scheduler was created before fabric.setup(): it still drives the optimizer that setup"
            " replaced (sharding gives the model new parameters). Create schedulers from the optimizer setup returns.",
            stacklevel=3,
        )
    cls = type(optimizer)
    accepted = _init_arguments(cls)
    defaults = {k: v for k, v in optimizer.defaults.items() if accepted is None or k in accepted}
    try:
        return cls(groups, **defaults)
    except TypeError as error:
        raise TypeError(
            f"Could not rebuild {cls.__name__} over the sharded parameters ({error}). Set up the model first,"
            " model = fabric.setup_module(model), then create the optimizer from model.parameters() and call"
            " fabric.setup_optimizers(optimizer)."
        ) from error


def _init_arguments(cls: type) -> Optional[set[str]]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def total_gradient_norm(params: list[Tensor], norm_type: float, error_if_nonfinite: bool) -> Tensor:
    """The norm of every gradient over every rank: local norms per (mesh, placements), made whole, combined."""
    from torch.distributed.tensor import DTensor

    by_layout: dict[Any, list[Tensor]] = {}
    for p in params:
        grad = p.grad
        key = (id(grad.device_mesh), tuple(grad.placements)) if isinstance(grad, DTensor) else None
        by_layout.setdefault(key, []).append(grad)
    norms = []
    for grads in by_layout.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms).float(), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} of the gradients is non-finite, so it cannot be clipped."
            " Pass error_if_nonfinite=False to fabric.clip_gradients() to clip anyway."
        )
    return total


@contextmanager
def _no_gradient_sync(modules: list[nn.Module]) -> Iterator[None]:
    for module in modules:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=False)
