"""Precision under DeepSpeed: the engine owns dtypes and loss scaling (its ``bf16``/``fp16`` config).

This plugin only casts what crosses the model's boundary: floating inputs to the engine's dtype,
outputs back to the default dtype, and (for the ``-true`` precisions) the module and new tensors
to the half dtype. Importing it does not import deepspeed.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..utilities.apply import apply_to_collection
from .base import DtypeDefault, Precision, module_to_floating_dtype

#: the precisions DeepSpeed can run, and the dtype its engine computes in
DEEPSPEED_PRECISIONS = {
    "32-true": torch.float32,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
}


class DeepSpeedPrecision(Precision):
    """``precision=`` for :class:`~notebook_fabric.strategies.deepspeed.DeepSpeedStrategy`.

    >>> DeepSpeedPrecision("bf16-mixed").config_section()
    {'bf16': {'enabled': True}}
    """

    def __init__(self, precision: str = "32-true") -> None:
        if precision not in DEEPSPEED_PRECISIONS:
            raise ValueError(
                f"DeepSpeed does not support precision={precision!r}. Choose one of {list(DEEPSPEED_PRECISIONS)}."
            )
        self.precision = precision
        self.dtype = DEEPSPEED_PRECISIONS[precision]

    def config_section(
        self,
        loss_scale: float = 0.0,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        min_loss_scale: float = 1,
    ) -> dict[str, Any]:
        """The DeepSpeed config entries for this precision: ``bf16``, ``fp16`` (dynamic loss scaling when
        ``loss_scale`` is 0), or nothing for 32-bit."""
        if self.dtype is torch.bfloat16:
            return {"bf16": {"enabled": True}}
        if self.dtype is torch.float16:
            return {
                "fp16": {
                    "enabled": True,
                    "loss_scale": loss_scale,
                    "initial_scale_power": initial_scale_power,
                    "loss_scale_window": loss_scale_window,
                    "hysteresis": hysteresis,
                    "min_loss_scale": min_loss_scale,
                }
            }
        return {}

    def convert_module(self, module: nn.Module) -> nn.Module:
        if self.precision.endswith("-true") and self.dtype is not torch.float32:
            return module_to_floating_dtype(module, self.dtype)
        return module

    def module_init_context(self) -> ContextManager:
        return self.tensor_init_context()

    def tensor_init_context(self) -> ContextManager:
        if self.precision.endswith("-true") and self.dtype is not torch.float32:
            return DtypeDefault(self.dtype)
        return nullcontext()

    def convert_input(self, data: Any) -> Any:
        if self.dtype is torch.float32:
            return data
        return apply_to_collection(data, Tensor, _cast_floating, self.dtype)

    def convert_output(self, data: Any) -> Any:
        if self.dtype is torch.float32:
            return data
        return apply_to_collection(data, Tensor, _cast_floating, torch.get_default_dtype())

    def backward(self, tensor: Tensor, model: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        """The engine's backward: it scales the loss (fp16) and reduces/partitions gradients."""
        if model is None or not hasattr(model, "backward"):
            raise RuntimeError("DeepSpeed's backward runs through its engine: pass the model set up by fabric.setup()")
        model.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return optimizer.step(**kwargs)


def _cast_floating(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def to_deepspeed_precision(precision: Precision) -> DeepSpeedPrecision:
    """The DeepSpeed plugin for whatever ``Precision`` the connector resolved (``MixedPrecision("bf16-mixed")`` ...)."""
    if isinstance(precision, DeepSpeedPrecision):
        return precision
    name = getattr(precision, "precision", None)
    if type(precision) not in _CONVERTIBLE or name not in DEEPSPEED_PRECISIONS:
        raise ValueError(
            f"DeepSpeed runs its own precision (the engine's bf16/fp16 config) and cannot use {precision!r}."
            f" Pass precision= one of {list(DEEPSPEED_PRECISIONS)}, or a DeepSpeedPrecision."
        )
    return DeepSpeedPrecision(name)


def _convertible() -> tuple[type, ...]:
    from .mixed import MixedPrecision
    from .true_dtype import TruePrecision

    return (Precision, MixedPrecision, TruePrecision)


_CONVERTIBLE = _convertible()
