"""Collectives on nested collections: every tensor leaf goes through the strategy, one call each."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..utilities.apply import apply_to_collection


def _as_tensor(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # bools stay flags
        return torch.tensor(value, device=device)
    return value


def tensors_to_device(data: Any, device: torch.device) -> Any:
    """Numbers inside ``data`` become tensors on ``device``, so metric dicts like ``{"acc": 0.9}`` can be reduced."""
    if isinstance(data, Tensor):
        return data if data.device == device else data.to(device)
    return apply_to_collection(data, (Tensor, int, float), _as_tensor, device)


def map_tensors(data: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """``function`` applied to each tensor of ``data``; the tensor case skips the collection walk."""
    if isinstance(data, Tensor):
        return function(data)
    return apply_to_collection(data, Tensor, function)
