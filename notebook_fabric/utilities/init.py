"""``fabric.init_module(empty_init=True)`` where nothing is sharded: allocate, skip the initialisation.

>>> import torch
>>> with SkipInitialization():
...     layer = torch.nn.Linear(1000, 1000)  # memory allocated, ``reset_parameters`` draws nothing
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode


#: the in-place random fills that ``torch.nn.init``'s helpers end in (``xavier_uniform_`` -> ``Tensor.uniform_``)
_RANDOM_FILLS = frozenset(
    getattr(torch.Tensor, name)
    for name in ("uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_")
)


class SkipInitialization(TorchFunctionMode):
    """Turn every ``torch.nn.init`` function, and the in-place random fills they use, into no-ops that
    return the tensor untouched.

    Useful when the weights are loaded from a checkpoint right after the model is built: the
    tensors hold whatever memory they got, and no time is spent drawing random values (the random
    number generators are not advanced either). Deterministic fills (``zero_``, ``fill_``) still run.
    """

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


__all__ = ["SkipInitialization"]
