"""Splitting any sampler across ranks, so that each rank reads a disjoint share of what it yields.

>>> from torch.utils.data import SubsetRandomSampler
>>> fold = SubsetRandomSampler(range(0, 100, 2))       # k-fold cross-validation: one fold's indices
>>> shares = [set(SamplerShard(fold, num_replicas=2, rank=r)) for r in (0, 1)]
>>> shares[0].isdisjoint(shares[1]) and len(shares[0] | shares[1]) == 50
True
"""
from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sized

import torch
from torch.utils.data import Sampler


class SamplerShard(Sampler):
    """Rank ``rank``'s share of ``sampler``: positions ``rank, rank + num_replicas, ...`` of its order.

    Every rank draws the sampler's order alike: while it is drawn, torch's and Python's random
    generators are seeded with ``seed + epoch`` (a sampler with its own ``generator`` uses that, so
    give it the same seed on every rank). As with ``DistributedSampler``, the order is padded by
    repeating its start so that each rank gets the same number of samples (``drop_last=True``
    drops the tail instead).
    """

    def __init__(self, sampler: Sized, num_replicas: int, rank: int, seed: int = 0, drop_last: bool = False) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, {num_replicas})")
        _check_finite_length(sampler)
        self.sampler = sampler
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new order for the next pass (the wrapped sampler hears of the epoch too)."""
        self.epoch = epoch
        inner = getattr(self.sampler, "set_epoch", None)
        if callable(inner):
            inner(epoch)

    def __len__(self) -> int:
        total = len(self.sampler)
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[Any]:
        order = self._draw()
        per_rank = len(self)
        size = per_rank * self.num_replicas
        if len(order) < size:
            order += (order * math.ceil(size / max(len(order), 1)))[: size - len(order)]
        return iter(order[:size][self.rank : size : self.num_replicas])

    def _draw(self) -> list[Any]:
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            random.seed(self.seed + self.epoch)
            try:
                return list(self.sampler)
            finally:
                random.setstate(python_state)

    def __repr__(self) -> str:
        return f"SamplerShard({self.sampler!r}, num_replicas={self.num_replicas}, rank={self.rank})"


def _check_finite_length(sampler: Any) -> None:
    """``TypeError`` naming the fixes when ``sampler`` cannot be split: it has no (finite) ``__len__``."""
    method = getattr(sampler, "__len__", None)
    length = method() if callable(method) else None  # not len(): it refuses an infinite float
    if length is None or length == float("inf"):
        what = "no __len__" if length is None else "an infinite __len__"
        raise TypeError(
            f"You seem to have configured a sampler in your DataLoader ({type(sampler).__name__}) with {what}:"
            " it cannot be split across the ranks (each rank's share is a slice of its order). Give the sampler a"
            " finite __len__, remove it from the DataLoader, or pass use_distributed_sampler=False to"
            " setup_dataloaders and split the data yourself."
        )
