"""Whole-model precisions: parameters, inputs and math all in one dtype (64-true, 16-true, bf16-true)."""
from __future__ import annotations

from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from ..utilities.apply import apply_to_collection
from .base import DtypeDefault, Precision, module_to_floating_dtype


class TruePrecision(Precision):
    """Convert the model to ``dtype`` at setup and cast floating inputs to it.

    >>> TruePrecision("bf16-true").dtype
    torch.bfloat16
    """

    DTYPES = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}

    def __init__(self, precision: str) -> None:
        if precision not in self.DTYPES:
            raise ValueError(f"TruePrecision takes one of {list(self.DTYPES)}, got {precision!r}")
        self.precision = precision
        self.dtype = self.DTYPES[precision]

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module_to_floating_dtype(module, self.dtype)

    def module_init_context(self) -> ContextManager:
        return DtypeDefault(self.dtype)

    def tensor_init_context(self) -> ContextManager:
        return DtypeDefault(self.dtype)

    def forward_context(self) -> ContextManager:
        return DtypeDefault(self.dtype)

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, Tensor, self._cast_floating)

    def convert_output(self, data: Any) -> Any:
        default = torch.get_default_dtype()
        return apply_to_collection(data, Tensor, lambda t: t.to(default) if t.is_floating_point() else t)

    def _cast_floating(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor
