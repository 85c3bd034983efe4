"""Turning live objects into checkpoint contents and back, in place."""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim import Optimizer


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's own module behind Fabric's wrapper and DDP/DP containers."""
    module = getattr(module, "_original_module", module)
    while isinstance(module, (DistributedDataParallel, DataParallel)):
        module = module.module
    return module


def unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


def _is_module(value: Any) -> bool:
    return isinstance(value, nn.Module)


def _is_optimizer(value: Any) -> bool:
    return isinstance(unwrap_optimizer(value), Optimizer)


def to_saveable(
    strategy: Any, state: dict[str, Any], filters: Optional[dict[str, Callable[[str, Any], bool]]] = None
) -> dict[str, Any]:
    """``state`` with modules and optimizers replaced by their state dicts (through ``strategy``)."""
    filters = filters or {}
    unknown = set(filters) - set(state)
    if unknown:
        raise KeyError(f"filter names {sorted(unknown)} which the state does not have (keys: {sorted(state)})")
    saveable: dict[str, Any] = {}
    for key, value in state.items():
        if _is_module(value):
            value = strategy.get_module_state_dict(value)
        elif _is_optimizer(value):
            value = strategy.get_optimizer_state(value)
        if key in filters and isinstance(value, dict):
            keep = filters[key]
            value = {name: item for name, item in value.items() if keep(name, item)}
        saveable[key] = value
    return saveable


def restore(strategy: Any, state: Any, checkpoint: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Load ``checkpoint`` into ``state`` in place; return the checkpoint entries ``state`` does not name.

    ``state`` may be a dict of modules, optimizers and plain values, or one module or optimizer.
    """
    if _is_module(state):
        strategy.load_module_state_dict(state, checkpoint, strict=strict)
        return {}
    if _is_optimizer(state):
        strategy.load_optimizer_state(state, checkpoint)
        return {}
    missing = [key for key in state if key not in checkpoint]
    if missing and strict:
        raise KeyError(
            f"The checkpoint has no entry for {missing}; it holds {sorted(checkpoint)}."
            " Pass strict=False to load what is there."
        )
    for key, target in state.items():
        if key not in checkpoint:
            continue
        value = checkpoint[key]
        if _is_module(target):
            strategy.load_module_state_dict(target, value, strict=strict)
        elif _is_optimizer(target):
            strategy.load_optimizer_state(target, value)
        else:
            state[key] = value
    return {key: value for key, value in checkpoint.items() if key not in state}
