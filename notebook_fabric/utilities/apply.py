"""Map a function over the tensors of a nested collection (dicts, lists, tuples, namedtuples, dataclasses)."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Union


def apply_to_collection(data: Any, dtype: Union[type, tuple], function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Return ``data`` with every element of type ``dtype`` replaced by ``function(element, *args, **kwargs)``.

    >>> apply_to_collection({"a": [1, 2.0]}, float, lambda x: x * 2)
    {'a': [1, 4.0]}
    """
    if isinstance(data, dtype):
        return function(data, *args, **kwargs)
    if isinstance(data, dict):
        return _rebuild_mapping(data, {k: apply_to_collection(v, dtype, function, *args, **kwargs) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(apply_to_collection(v, dtype, function, *args, **kwargs) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_collection(v, dtype, function, *args, **kwargs) for v in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            f.name: apply_to_collection(getattr(data, f.name), dtype, function, *args, **kwargs)
            for f in dataclasses.fields(data)
            if f.init
        }
        return dataclasses.replace(data, **changes)
    return data


def tensors_to_cpu(data: Any) -> Any:
    """``data`` with every tensor detached and moved to the CPU (what travels back from a rank).

    torch is not imported for it: where this process has not imported torch there is no tensor to move.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return data
    return apply_to_collection(data, torch.Tensor, lambda tensor: tensor.detach().cpu())


def _rebuild_mapping(original: dict, values: dict) -> dict:
    if type(original) is dict:
        return values
    try:
        rebuilt = type(original)()
        rebuilt.update(values)
        return rebuilt
    except TypeError:  # e.g. defaultdict needs its factory
        rebuilt = original.copy()
        rebuilt.update(values)
        return rebuilt
