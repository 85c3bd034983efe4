"""What ``fabric.setup()`` and ``fabric.setup_dataloaders()`` return: thin wrappers that keep the hot path clean."""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from types import MethodType
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .precision import Precision
from .utilities.apply import apply_to_collection

_WRAPPER_ATTRIBUTES = ("_forward_module", "_original_module", "_strategy", "_precision", "_plain", "_routes",
                       "_forward_methods", "_forward_depth", "_needs_fabric_backward")
#: methods that always run through the strategy's wrapped forward (as a LightningModule's steps do in Lightning)
STEP_METHODS = frozenset({"training_step", "validation_step", "test_step", "predict_step"})
_MISSING = object()
#: how many ``fabric.backward()`` calls are running (a plain ``loss.backward()`` would skip their loss scaling or
#: engine). A count, not a flag: XLA:CPU ranks are threads of one process, and one rank's backward ending must
#: not make a peer's look plain; not thread-local either, as autograd runs a device's hooks on its own thread.
_fabric_backwards = 0
_fabric_backwards_lock = threading.Lock()


@contextmanager
def in_fabric_backward() -> Iterator[None]:
    """Mark the enclosed code as ``fabric.backward()`` (the check of :func:`_refuse_plain_backward` lets it through)."""
    global _fabric_backwards
    with _fabric_backwards_lock:
        _fabric_backwards += 1
    try:
        yield
    finally:
        with _fabric_backwards_lock:
            _fabric_backwards -= 1
_DELEGATED_OPTIMIZER_ATTRIBUTES = ("step", "state_dict", "zero_grad", "param_groups", "state", "defaults")


class _FabricModule(nn.Module):
    """Runs the model's forward under the precision's autocast and casting rules.

    Attribute access falls through to your own module, so ``model.my_layer`` keeps working; the
    state dict is your module's (no ``module.`` prefix from DDP).
    """

    def __init__(self, forward_module: nn.Module, strategy: Any, original_module: Optional[nn.Module] = None) -> None:
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module if original_module is not None else forward_module
        self._strategy = strategy
        self._precision: Precision = strategy.precision
        # full precision needs no casting and no autocast: skip that work on every call
        self._plain = type(self._precision) is Precision
        # a strategy that wraps the module (DDP, DeepSpeed's engine) or hooks into it (FSDP2, tensor
        # parallel) only does its work when the call goes through the wrapped forward
        self._routes = forward_module is not self._original_module or getattr(strategy, "hooks_module", False)
        self._forward_methods: set[str] = set(STEP_METHODS)
        self._forward_depth = [0]  # > 0 while the wrapped forward runs (a list: no nn.Module.__setattr__ per call)
        # fabric.backward() does work a plain loss.backward() would skip: loss scaling (16-mixed), an engine's
        # backward (DeepSpeed). Then the outputs refuse a backward that does not come through Fabric.
        self._needs_fabric_backward = getattr(self._precision, "scaler", None) is not None or (
            _overrides(strategy, "backward")
        )

    @property
    def module(self) -> nn.Module:
        return self._original_module

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (your module's own ``device`` attribute if it has one)."""
        original = self._original_module
        own = getattr(original, "device", _MISSING)
        if own is not _MISSING:
            return own
        for tensor in original.parameters():
            return tensor.device
        for tensor in original.buffers():
            return tensor.device
        return self._strategy.root_device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._routes:
            depth = self._forward_depth
            depth[0] += 1
            try:
                return self._forward(*args, **kwargs)
            finally:
                depth[0] -= 1
        return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._plain:
            output = self._forward_module(*args, **kwargs)
        else:
            precision = self._precision
            args, kwargs = precision.convert_input((args, kwargs))
            with precision.forward_context():
                output = self._forward_module(*args, **kwargs)
            output = precision.convert_output(output)
        if self._needs_fabric_backward and torch.is_grad_enabled():
            apply_to_collection(output, Tensor, _refuse_plain_backward)
        return output

    def mark_forward_method(self, method: Union[MethodType, str]) -> None:
        """Run ``model.<method>(...)`` through the strategy's wrapped forward, as ``model(...)`` runs.

        ``training_step``, ``validation_step``, ``test_step`` and ``predict_step`` are marked already.
        Under DDP, FSDP, DeepSpeed and model parallelism, calling another method of your model that
        runs its layers raises until you mark it, since its gradients would not be synchronised::

            model = fabric.setup(model)
            model.mark_forward_method("generate")  # or model.mark_forward_method(model.generate)
            tokens = model.generate(prompt)
        """
        if isinstance(method, str):
            name = method
        elif isinstance(method, MethodType):
            name = method.__name__
        else:
            raise TypeError(f"mark_forward_method() takes a method or its name, got {type(method).__name__}")
        if name == "forward":
            raise ValueError("forward already runs through the wrapper: mark other methods, not 'forward'")
        if not isinstance(getattr(self._original_module, name, None), MethodType):
            raise AttributeError(f"{type(self._original_module).__name__} has no method {name!r} to mark")
        self._forward_methods.add(name)

    def _routed(self, name: str) -> Callable[..., Any]:
        """``original.<name>`` called through the wrapped forward: while it runs, ``original.forward`` is
        the method, so DDP's (or FSDP's, DeepSpeed's) ``__call__`` runs it with its hooks around it."""
        original = self._original_module
        method = getattr(original, name)

        @functools.wraps(method)
        def through_forward(*args: Any, **kwargs: Any) -> Any:
            saved = original.__dict__.get("forward", _MISSING)

            def as_forward(*inner_args: Any, **inner_kwargs: Any) -> Any:
                _restore_forward(original, saved)  # the method may call the real forward itself
                return method(*inner_args, **inner_kwargs)

            original.__dict__["forward"] = as_forward
            try:
                return self.forward(*args, **kwargs)
            finally:
                if original.__dict__.get("forward") is as_forward:
                    _restore_forward(original, saved)

        return through_forward

    def _guarded(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method``, refusing to run a layer of the model outside the wrapped forward."""
        original = self._original_module
        depth = self._forward_depth

        def refuse(module: nn.Module, _: Any) -> None:
            if depth[0] == 0:
                raise RuntimeError(
                    f"{type(original).__name__}.{name}() runs the model's layers outside the {type(self._strategy).__name__}"
                    " wrapper, so its gradients would not be synchronised across ranks. Call the model itself, or mark"
                    f" the method after setup: model.mark_forward_method({name!r})."
                )

        @functools.wraps(method)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if depth[0] > 0:
                return method(*args, **kwargs)
            handles = [module.register_forward_pre_hook(refuse) for module in original.modules()]
            try:
                return method(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()

        return guarded

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, **kwargs: Any) -> Any:
        return self._original_module.load_state_dict(state_dict, strict=strict, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        original = super().__getattr__("_original_module")
        attribute = getattr(original, name)
        if not self.__dict__.get("_routes") or not isinstance(attribute, MethodType):
            return attribute
        if name in self.__dict__["_forward_methods"]:
            return self._routed(name)
        return self._guarded(name, attribute)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WRAPPER_ATTRIBUTES or "_original_module" not in self._modules:
            super().__setattr__(name, value)
        elif not hasattr(type(self), name) and name not in self.__dict__:
            # your module's attribute, or a new one (as in Lightning: the model's own code reads it as self.<name>)
            setattr(self._original_module, name, value)
        else:
            super().__setattr__(name, value)

    def __repr__(self) -> str:
        return f"FabricModule({self._original_module!r})"


def _restore_forward(module: nn.Module, saved: Any) -> None:
    if saved is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = saved


class _FabricOptimizer:
    """Your optimizer, whose ``step()`` goes through the strategy (loss scaling, DeepSpeed, ...).

    It is an instance of your optimizer's class too, so LR schedulers and ``isinstance`` checks work.
    """

    def __init__(self, optimizer: Optimizer, strategy: Any, callbacks: Optional[list] = None) -> None:
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in _DELEGATED_OPTIMIZER_ATTRIBUTES}
        self.__class__ = type(f"Fabric{type(optimizer).__name__}", (_FabricOptimizer, type(optimizer)), {})
        self._optimizer = optimizer
        self._strategy = strategy
        self._callbacks = callbacks or []

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    # ``Optimizer.load_state_dict`` replaces these on the optimizer: read them from it, never from a copy
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = param_groups

    @property
    def state(self) -> Any:
        return self._optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self._optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self._optimizer.defaults = defaults

    def state_dict(self) -> dict[str, Any]:
        return self._strategy.get_optimizer_state(self._optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Any] = None) -> Any:
        kwargs = {"closure": closure} if closure is not None else {}
        output = self._strategy.optimizer_step(self._optimizer, **kwargs)
        for callback in self._callbacks:
            hook = getattr(callback, "on_after_optimizer_step", None)
            if callable(hook):
                hook(strategy=self._strategy, optimizer=self._optimizer)
        return output

    def __repr__(self) -> str:
        return f"FabricOptimizer({self._optimizer!r})"


class _FabricDataLoader:
    """Iterates your DataLoader, moves each batch to the device, and advances the sampler's epoch."""

    def __init__(self, dataloader: Any, device: Optional[torch.device] = None) -> None:
        self._dataloader = dataloader
        self._device = device if device is not None and device.type != "cpu" else None
        self._num_iter_calls = 0

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    def __len__(self) -> int:
        return len(self._dataloader)

    def __iter__(self) -> Iterator[Any]:
        sampler = getattr(self._dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self._num_iter_calls)
        batch_sampler = getattr(getattr(self._dataloader, "batch_sampler", None), "sampler", None)
        if batch_sampler is not sampler and hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(self._num_iter_calls)
        self._num_iter_calls += 1
        device = self._device
        if device is None:
            yield from self._dataloader
            return
        for batch in self._dataloader:
            yield apply_to_collection(batch, Tensor, _to_device, device)

    def __getattr__(self, name: str) -> Any:
        if name == "_dataloader":
            raise AttributeError(name)
        return getattr(self._dataloader, name)

    def __repr__(self) -> str:
        return f"FabricDataLoader({self._dataloader!r})"


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    return tensor.to(device, non_blocking=True)


def _overrides(strategy: Any, name: str) -> bool:
    """Whether ``strategy``'s class replaces the base Strategy's method ``name``."""
    from .strategies.base import Strategy

    return isinstance(strategy, Strategy) and getattr(type(strategy), name, None) is not getattr(Strategy, name)


def _refuse_plain_backward(tensor: Tensor) -> Tensor:
    if tensor.requires_grad:
        tensor.register_hook(_check_in_fabric_backward)
    return tensor


def _check_in_fabric_backward(gradient: Tensor) -> None:
    if not _fabric_backwards:
        raise RuntimeError(
            "The current strategy and precision selection requires you to call `fabric.backward(loss)` instead of"
            " `loss.backward()`: it scales the loss (16-mixed) or runs the strategy's own backward (DeepSpeed), which"
            " a plain backward skips."
        )
