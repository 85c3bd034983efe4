"""Rebuilding a DataLoader so that each rank reads its own shard."""
from __future__ import annotations

import copy
import os
from functools import partial
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

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
    """A copy of ``loader`` whose sampler is a ``DistributedSampler`` for ``rank`` of ``num_replicas``.

    Shuffling is kept (a RandomSampler becomes a shuffling DistributedSampler seeded with the
    global seed, so every rank agrees on the permutation).
    """
    if isinstance(loader.dataset, IterableDataset):
        return loader  # an iterable dataset shards itself (use get_worker_info / rank in __iter__)
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader
    if not isinstance(sampler, (SequentialSampler, RandomSampler)):
        raise TypeError(
            f"This DataLoader uses a custom sampler ({type(sampler).__name__}) that cannot be split across ranks"
            " automatically. Pass use_distributed_sampler=False to setup_dataloaders and shard it yourself,"
            " or give the DataLoader a DistributedSampler."
        )
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        raise TypeError(
            f"This DataLoader uses a custom batch sampler ({type(loader.batch_sampler).__name__});"
            " pass use_distributed_sampler=False and shard it yourself."
        )
    seed = int(os.environ.get(SEED_ENV, 0))
    distributed = DistributedSampler(
        loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=isinstance(sampler, RandomSampler), seed=seed,
        drop_last=loader.drop_last,
    )  # fmt: skip
    batch_size = loader.batch_size
    kwargs = _loader_kwargs(loader)
    if batch_size is None:
        return DataLoader(loader.dataset, batch_size=None, sampler=distributed, **kwargs)
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=distributed, drop_last=loader.drop_last, **kwargs)


def with_seeded_workers(loader: DataLoader, rank: int) -> DataLoader:
    """Give ``loader``'s workers a per-worker, per-rank seed when ``seed_everything(workers=True)`` was called."""
    if not workers_should_be_seeded() or loader.num_workers == 0 or loader.worker_init_fn is not None:
        return loader
    loader = copy.copy(loader)  # the user's own DataLoader stays as it was
    loader.worker_init_fn = partial(worker_init_function, rank=rank)
    return loader
