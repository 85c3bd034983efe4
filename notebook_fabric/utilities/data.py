"""Rebuilding a DataLoader (of its own class) so that each rank reads its own shard."""
from __future__ import annotations

import copy
import inspect
import os
from functools import partial
from typing import Any

from torch.utils.data import (
    BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler,
)  # fmt: skip

from .samplers import SamplerShard
from .seed import SEED_ENV, worker_init_function, workers_should_be_seeded

_LOADER_ARGS = (
    "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
    "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order",
)  # fmt: skip


def _loader_kwargs(loader: DataLoader) -> dict[str, Any]:
    kwargs = {name: getattr(loader, name) for name in _LOADER_ARGS if hasattr(loader, name)}
    if kwargs.get("num_workers", 0) == 0:
        kwargs.pop("prefetch_factor", None)
        kwargs.pop("persistent_workers", None)
    return kwargs


def shard_dataloader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """A copy of ``loader`` whose sampler gives ``rank`` of ``num_replicas`` its own share.

    A ``SequentialSampler``/``RandomSampler`` becomes a ``DistributedSampler`` (shuffling kept,
    seeded with the global seed so every rank agrees on the permutation); any other sampler
    (``SubsetRandomSampler`` for k-fold cross-validation, ...) is split by :class:`SamplerShard`.
    A DataLoader subclass is rebuilt as that subclass (see :func:`rebuild_dataloader`).
    """
    if isinstance(loader.dataset, IterableDataset):
        return loader  # an iterable dataset shards itself (use get_worker_info / rank in __iter__)
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        raise TypeError(
            f"This DataLoader uses a custom batch sampler ({type(loader.batch_sampler).__name__});"
            " pass use_distributed_sampler=False and shard it yourself."
        )
    seed = int(os.environ.get(SEED_ENV, 0))
    if isinstance(sampler, (SequentialSampler, RandomSampler)):
        distributed: Sampler = DistributedSampler(
            loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=isinstance(sampler, RandomSampler),
            seed=seed, drop_last=loader.drop_last,
        )  # fmt: skip
    else:
        distributed = SamplerShard(sampler, num_replicas=num_replicas, rank=rank, seed=seed, drop_last=loader.drop_last)
    return rebuild_dataloader(loader, distributed)


def rebuild_dataloader(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """``loader`` made again, of its own class, with ``sampler``.

    A subclass is called with its ``__init__`` arguments read from the attributes of the same
    name (``self.tag = tag`` in its ``__init__`` is enough), and attributes set on it afterwards are
    copied over. ``TypeError`` names what cannot be rebuilt.
    """
    kwargs = _loader_kwargs(loader)
    if loader.batch_size is None:
        kwargs.update(batch_size=None, sampler=sampler)
    else:
        kwargs.update(batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last)
    cls = type(loader)
    if cls is DataLoader:
        return DataLoader(loader.dataset, **kwargs)
    args, subclass_kwargs = _subclass_arguments(loader, cls, kwargs)
    rebuilt = cls(*args, **subclass_kwargs)
    for name, value in vars(loader).items():  # what the subclass or the user added, kept as it was
        if name not in vars(rebuilt) and not name.startswith("_"):
            setattr(rebuilt, name, value)
    return rebuilt


def _subclass_arguments(loader: DataLoader, cls: type, loader_kwargs: dict[str, Any]) -> tuple[list, dict]:
    """``(args, kwargs)`` for ``cls(...)``: the new loader settings where its signature takes them, and the
    instance's attributes for its own parameters."""
    parameters = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    wanted = {"dataset": loader.dataset, **loader_kwargs}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    missing = []
    for name, parameter in list(parameters.items())[1:]:  # skip self
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in wanted:
            value = wanted.pop(name)
        elif name == "shuffle":  # the new sampler decides the order
            value = False
        elif name in vars(loader) or hasattr(type(loader), name):
            value = getattr(loader, name)
        elif parameter.default is not parameter.empty:
            continue
        else:
            missing.append(name)
            continue
        if parameter.kind is parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    unplaced = [name for name in ("sampler",) if name in wanted and not accepts_any]
    if missing or unplaced:
        problems = []
        if missing:
            problems.append(f"its __init__ arguments {missing} are not attributes of the instance (store them as"
                            f" self.{missing[0]} = {missing[0]} in __init__)")  # fmt: skip
        if unplaced:
            problems.append("its __init__ takes no `sampler` argument (accept **kwargs and pass them to DataLoader)")
        raise TypeError(
            f"Cannot rebuild {cls.__name__} with a distributed sampler: " + "; ".join(problems)
            + ". Or pass use_distributed_sampler=False to setup_dataloaders and shard the data yourself."
        )
    if accepts_any:  # the rest of the settings travel through **kwargs (the subclass passes its own dataset)
        kwargs.update({k: v for k, v in wanted.items() if k != "dataset"})
    return args, kwargs


def with_seeded_workers(loader: DataLoader, rank: int) -> DataLoader:
    """Give ``loader``'s workers a per-worker, per-rank seed when ``seed_everything(workers=True)`` was called."""
    if not workers_should_be_seeded() or loader.num_workers == 0 or loader.worker_init_fn is not None:
        return loader
    loader = copy.copy(loader)  # the user's own DataLoader stays as it was
    loader.worker_init_fn = partial(worker_init_function, rank=rank)
    return loader
