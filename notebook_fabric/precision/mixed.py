"""Automatic mixed precision: float32 weights, autocast in forward, loss scaling under float16.

Floating inputs of the model's forward are cast to the half dtype and floating outputs back to
float32, as Lightning does, so a loop gives the same numbers under both.
"""
from __future__ import annotations

from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer

from ..utilities.apply import apply_to_collection
from .base import Precision, cast_floating


class MixedPrecision(Precision):
    """``"16-mixed"`` or ``"bf16-mixed"`` on ``device_type`` ("cuda", "cpu", ...; Lightning's keyword
    ``device=`` is accepted too).

    Under 16-mixed a ``torch.amp.GradScaler`` scales the loss, unscales before clipping, and skips
    steps whose gradients overflowed.
    """

    def __init__(self, precision: str, device_type: Optional[str] = None, scaler: Optional["torch.amp.GradScaler"] = None,
                 *, device: Optional[str] = None) -> None:
        if device is not None:  # Lightning's name of the argument: MixedPrecision("16-mixed", device="cuda")
            if device_type is not None and device_type != device:
                raise ValueError(f"MixedPrecision got device_type={device_type!r} and device={device!r}: pass one")
            device_type = device
        if device_type is None:
            raise TypeError("MixedPrecision needs the device type it autocasts on: MixedPrecision('16-mixed', 'cuda')")
        if precision not in ("16-mixed", "bf16-mixed"):
            raise ValueError(f"MixedPrecision takes '16-mixed' or 'bf16-mixed', got {precision!r}")
        self.precision = precision
        self.device_type = device_type
        self.dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
        if scaler is not None and precision == "bf16-mixed":
            raise ValueError("`precision='bf16-mixed'` does not use a scaler (bfloat16 has float32's range): drop `scaler=`")
        if scaler is None and precision == "16-mixed":
            scaler = torch.amp.GradScaler(device=device_type)
        self.scaler = scaler
        self._unscaled: set[int] = set()

    @property
    def device(self) -> str:
        """Lightning's name of :attr:`device_type`."""
        return self.device_type

    def forward_context(self) -> ContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype)

    def convert_input(self, data: Any) -> Any:
        """Floating tensors entering the model's forward become the half dtype (integer ones stay)."""
        return apply_to_collection(data, Tensor, cast_floating, self.dtype)

    def convert_output(self, data: Any) -> Any:
        """Floating tensors leaving the forward come back in the default dtype (float32), so the loss is."""
        return apply_to_collection(data, Tensor, cast_floating, torch.get_default_dtype())

    def pre_backward(self, tensor: Tensor, module: Optional[nn.Module]) -> Tensor:
        return self.scaler.scale(tensor) if self.scaler is not None else tensor

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        if self.scaler is None:
            return optimizer.step(**kwargs)
        if isinstance(optimizer, LBFGS):
            raise TypeError("precision='16-mixed' cannot drive LBFGS (it needs closures the scaler cannot replay); use 'bf16-mixed'")
        result = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        self._unscaled.discard(id(optimizer))
        return result

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and state_dict:
            self.scaler.load_state_dict(state_dict)
