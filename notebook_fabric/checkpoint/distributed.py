"""Checkpoints of DTensor models (FSDP2, tensor parallel) on ``torch.distributed.checkpoint`` (DCP).

Two formats:

- **full** (one file, the same layout a single-device Fabric writes): every module's complete
  state dict and every optimizer's state in ``torch.optim``'s own layout (integer parameter ids),
  gathered to rank 0, which writes the file. It loads into any strategy and any world size.
- **sharded** (a directory): each rank writes its own shards with ``dcp.save``; values that are not
  modules or optimizers go to ``meta.pt`` (written by rank 0). DCP reshards on load, so a
  directory saved on 4 ranks loads on 2. :func:`consolidate` turns one into a full file.

>>> save_sharded("ckpt/", {"model": model, "optimizer": optimizer, "step": 10}, module_of)  # doctest: +SKIP
>>> remainder = load_sharded("ckpt/", {"model": model, "optimizer": optimizer}, module_of)  # doctest: +SKIP

``module_of(optimizer)`` names the (set-up) module whose parameters an optimizer updates: DCP
needs the pair to name optimizer states by parameter name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import io
from .state import to_saveable, unwrap_optimizer

PathLike = Union[str, "Path"]
ModuleOf = Callable[[Optimizer], nn.Module]
META_FILE = "meta.pt"
#: wrapper segments that DCP leaves out of parameter names (activation checkpointing, torch.compile)
_WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_checkpoint_wrapped_module|_orig_mod)\.")


# ----- what is what ------------------------------------------------------------------------------
def forward_module(module: nn.Module) -> nn.Module:
    """The module that runs (and owns the sharded parameters) behind Fabric's wrapper."""
    return getattr(module, "_forward_module", module)


def is_module(value: Any) -> bool:
    return isinstance(value, nn.Module)


def is_optimizer(value: Any) -> bool:
    return isinstance(unwrap_optimizer(value), Optimizer)


def is_sharded_checkpoint(path: PathLike) -> bool:
    """True for a directory written by ``dcp.save`` (it holds a ``.metadata`` file)."""
    folder = Path(path)
    return folder.is_dir() and (folder / ".metadata").is_file()


def has_dtensors(state_dict: dict[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(value, DTensor) for value in state_dict.values())


def parameter_name(name: str) -> str:
    """``name`` as DCP spells it: wrapper segments (``_checkpoint_wrapped_module``) removed."""
    return _WRAPPER_SEGMENTS.sub("", name)


# ----- state dicts -------------------------------------------------------------------------------
def _options(full: bool, strict: bool = True, cpu_offload: Optional[bool] = None) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    offload = full if cpu_offload is None else cpu_offload
    return StateDictOptions(full_state_dict=full, cpu_offload=offload, strict=strict)


def model_state(module: nn.Module, full: bool, rank0_only: bool = True) -> dict[str, Any]:
    """The module's state dict: sharded (DTensors) or ``full`` (plain CPU tensors; with
    ``rank0_only`` only rank 0 gets them, the others an empty dict). ``full`` is a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(forward_module(module), options=_options(full, cpu_offload=full and rank0_only))


def optimizer_state(module: nn.Module, optimizer: Any, full: bool, rank0_only: bool = True) -> dict[str, Any]:
    """The optimizer's state: sharded (keyed by parameter name, DTensors) or ``full``, in
    ``torch.optim``'s layout (integer ids, plain tensors) so a single-device optimizer loads it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    options = _options(full, cpu_offload=full and rank0_only)
    state = get_optimizer_state_dict(forward_module(module), unwrap_optimizer(optimizer), options=options)
    return indexed_optimizer_state(state) if full and state else state


def indexed_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (DCP's) in ``torch.optim``'s layout: ids numbered through the groups."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def named_optimizer_state(module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """:func:`indexed_optimizer_state` reversed, for this optimizer's parameters (name-keyed states pass through)."""
    groups = state.get("param_groups", [])
    if all(isinstance(p, str) for group in groups for p in group["params"]):
        return state
    names = {id(param): parameter_name(name) for name, param in forward_module(module).named_parameters()}
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"The checkpoint's optimizer has {len(groups)} parameter groups, this optimizer"
            f" {len(optimizer.param_groups)}: build the optimizer with the same groups as the one that was saved."
        )
    renamed: dict[Any, str] = {}
    new_groups = []
    for saved, live in zip(groups, optimizer.param_groups):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"A parameter group of the checkpoint holds {len(saved['params'])} parameters, this optimizer's"
                f" {len(live['params'])}: the model or the optimizer's groups differ from the saved ones."
            )
        for saved_id, param in zip(saved["params"], live["params"]):
            renamed[saved_id] = names[id(param)]
        new_groups.append({**saved, "params": [renamed[i] for i in saved["params"]]})
    return {"state": {renamed[i]: value for i, value in state["state"].items()}, "param_groups": new_groups}


def load_model_state(module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Load a sharded (DTensor) or full (plain tensors, e.g. from a single-device run) state dict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    full = not has_dtensors(state_dict)
    set_model_state_dict(forward_module(module), state_dict, options=_options(full, strict=strict, cpu_offload=False))


def load_optimizer_state(module: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load an optimizer state: torch.optim's layout (any strategy's full checkpoint) or DCP's name-keyed one."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    optimizer = unwrap_optimizer(optimizer)
    state = named_optimizer_state(module, optimizer, state)
    tensors = [v for s in state["state"].values() for v in s.values() if isinstance(v, Tensor) and v.dim() > 0]
    # plain tensors: a full state to shard; DTensors, or no tensors at all (plain SGD): loaded as they are
    full = bool(tensors) and not any(isinstance(t, DTensor) for t in tensors)
    set_optimizer_state_dict(forward_module(module), optimizer, state, options=_options(full, cpu_offload=False))


# ----- full files --------------------------------------------------------------------------------
def save_full(
    path: PathLike,
    state: dict[str, Any],
    module_of: ModuleOf,
    filters: Optional[dict[str, Callable[[str, Any], bool]]] = None,
    is_global_zero: bool = True,
    checkpoint_io: Optional[Any] = None,
) -> None:
    """Gather ``state``'s modules and optimizers to rank 0, which writes one file in the layout a
    single-device Fabric writes (``checkpoint_io`` if given). Call it on every rank."""
    payload = to_saveable(_FullStates(module_of), state, filters)
    if not is_global_zero:
        return
    if checkpoint_io is not None:
        checkpoint_io.save_checkpoint(payload, path)
    else:
        io.atomic_save(payload, path)


class _FullStates:
    """What :func:`~.state.to_saveable` asks a strategy for, answered with full (gathered) states."""

    def __init__(self, module_of: ModuleOf) -> None:
        self._module_of = module_of

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return model_state(module, full=True)

    def get_optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return optimizer_state(self._module_of(unwrap_optimizer(optimizer)), optimizer, full=True)


# ----- sharded directories -----------------------------------------------------------------------
def _sharded_entries(state: dict[str, Any], module_of: ModuleOf) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for key, value in state.items():
        if is_module(value):
            entries[key] = model_state(value, full=False)
        elif is_optimizer(value):
            entries[key] = optimizer_state(module_of(unwrap_optimizer(value)), value, full=False)
    return entries


def save_sharded(
    path: PathLike,
    state: dict[str, Any],
    module_of: ModuleOf,
    filters: Optional[dict[str, Callable[[str, Any], bool]]] = None,
    is_global_zero: bool = True,
) -> None:
    """Every rank writes its shards of the modules and optimizers in ``state`` into the directory
    ``path``; rank 0 writes the other values to ``path/meta.pt``. Call it on every rank."""
    import torch.distributed.checkpoint as dcp

    folder = Path(path)
    if folder.is_file():
        raise FileExistsError(f"{str(folder)!r} is a file; a sharded checkpoint is a directory: choose another path")
    filters = filters or {}
    unknown = set(filters) - set(state)
    if unknown:
        raise KeyError(f"filter names {sorted(unknown)} which the state does not have (keys: {sorted(state)})")
    entries = _sharded_entries(state, module_of)
    meta = {key: value for key, value in state.items() if key not in entries}
    for key, keep in filters.items():
        for part in (entries, meta):
            if isinstance(part.get(key), dict):
                part[key] = {name: value for name, value in part[key].items() if keep(name, value)}
    dcp.save(entries, checkpoint_id=folder)
    if is_global_zero:
        io.atomic_save(meta, folder / META_FILE)


def load_sharded(
    path: PathLike, state: dict[str, Any], module_of: ModuleOf, strict: bool = True
) -> dict[str, Any]:
    """Restore ``state`` (a dict of modules, optimizers and values) from the directory ``path`` in
    place; return the saved values ``state`` does not name. Call it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    if not isinstance(state, dict):
        raise TypeError(
            f"A sharded checkpoint loads into a dict such as {{'model': model, 'optimizer': optimizer}},"
            f" got {type(state).__name__}"
        )
    folder = Path(path)
    meta_file = folder / META_FILE
    meta = io.load(meta_file, map_location="cpu") if meta_file.is_file() else {}
    saved_keys = _saved_top_level_keys(folder)
    missing = [key for key in state if key not in saved_keys and key not in meta]
    if missing and strict:
        raise KeyError(
            f"The checkpoint has no entry for {missing}; it holds {sorted(saved_keys | set(meta))}."
            " Pass strict=False to load what is there."
        )
    wanted = {key: value for key, value in state.items() if key in saved_keys}
    entries = _sharded_entries(wanted, module_of)
    if entries:
        dcp.load(entries, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=not strict))
    for key, value in wanted.items():
        if is_module(value):
            load_model_state(value, entries[key], strict=strict)
        elif is_optimizer(value):
            load_optimizer_state(module_of(unwrap_optimizer(value)), value, entries[key])
    for key in state:
        if key in meta and not (is_module(state[key]) or is_optimizer(state[key])):
            state[key] = meta[key]
    return {key: value for key, value in meta.items() if key not in state}


def _saved_top_level_keys(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def consolidate(path: PathLike, output: PathLike) -> Path:
    """Turn the sharded directory ``path`` into one full checkpoint file ``output`` (one process,
    no process group). Optimizer states stay keyed by parameter name; modules load anywhere.

    >>> consolidate("run/ckpt", "run/model.ckpt")  # doctest: +SKIP
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(path)
    if not is_sharded_checkpoint(folder):
        raise FileNotFoundError(f"{str(folder)!r} is not a sharded checkpoint directory (no .metadata inside)")
    target = Path(output)
    dcp_to_torch_save(folder, target)
    checkpoint = torch.load(target, map_location="cpu", weights_only=False)
    meta_file = folder / META_FILE
    if meta_file.is_file():
        checkpoint.update(io.load(meta_file, map_location="cpu"))
    io.atomic_save(checkpoint, target)
    return target

