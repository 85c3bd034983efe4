"""The precision interface, and full 32-bit precision (the default)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer


class Precision:
    """What a precision setting changes: module dtype, init dtype, autocast, loss scaling.

    The default does nothing: parameters and math stay in float32.
    """

    precision: str = "32-true"

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module

    def module_init_context(self) -> ContextManager:
        return nullcontext()

    def tensor_init_context(self) -> ContextManager:
        return nullcontext()

    def forward_context(self) -> ContextManager:
        return nullcontext()

    def convert_input(self, data: Any) -> Any:
        return data

    def convert_output(self, data: Any) -> Any:
        return data

    def pre_backward(self, tensor: Tensor, module: Optional[nn.Module]) -> Tensor:
        return tensor

    def backward(self, tensor: Tensor, model: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        tensor.backward(*args, **kwargs)

    def post_backward(self, tensor: Tensor, module: Optional[nn.Module]) -> Tensor:
        return tensor

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return optimizer.step(**kwargs)

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Bring gradients back to their true scale (only loss-scaling precisions change them)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def teardown(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.precision!r})"


class DtypeDefault:
    """Context manager that makes ``dtype`` the default floating dtype while it is open."""

    def __init__(self, dtype: torch.dtype) -> None:
        self._dtype = dtype
        self._previous: Optional[torch.dtype] = None

    def __enter__(self) -> None:
        self._previous = torch.get_default_dtype()
        torch.set_default_dtype(self._dtype)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._previous)


def cast_floating(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype`` if it is a real floating tensor; integer, bool and complex tensors as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def module_to_floating_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``module``'s real floating parameters and buffers to ``dtype``, the way ``module.double()`` does:
    complex and integer tensors keep their dtype (``module.to(dtype)`` would drop imaginary parts)."""
    return module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
