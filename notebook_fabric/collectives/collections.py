"""Collectives on nested collections: every tensor leaf goes through the strategy, one call each."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..utilities.apply import apply_to_collection

#: Python numbers become tensors of these dtypes (bool as uint8: no backend reduces torch.bool), as in Lightning
_NUMBER_DTYPES = ((bool, torch.uint8), (int, torch.int32), (float, torch.float32))


def _as_tensor(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device)
    for kind, dtype in _NUMBER_DTYPES:
        if isinstance(value, kind):
            return torch.tensor(value, dtype=dtype, device=device)
    return value


def tensors_to_device(data: Any, device: torch.device) -> Any:
    """``data`` with its leaves as tensors on ``device``: Python bools (as uint8), ints (int32), floats
    (float32) and NumPy arrays are converted, so ``{"acc": 0.9}`` can be reduced and
    ``all(fabric.all_gather(ok))`` works.

    >>> tensors_to_device({"ok": True, "n": [3, 0.5]}, torch.device("cpu"))
    {'ok': tensor(1, dtype=torch.uint8), 'n': [tensor(3, dtype=torch.int32), tensor(0.5000)]}
    """
    if isinstance(data, Tensor):
        return data if data.device == device else data.to(device)
    return apply_to_collection(data, (Tensor, bool, int, float, np.ndarray), _as_tensor, device)


def map_tensors(data: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """``function`` applied to each tensor of ``data``; the tensor case skips the collection walk."""
    if isinstance(data, Tensor):
        return function(data)
    return apply_to_collection(data, Tensor, function)
