"""Code that only global rank 0 should run: loggers' writes and their ``experiment`` objects.

>>> @rank_zero_only
... def write(line):
...     print(line)
>>> write("once")  # prints on rank 0, does nothing (returns None) on other ranks
once
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")

#: where a rank finds its global rank before (or without) a process group: launchers, torchrun, SLURM, LSF
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank: the process group's if there is one, else from the environment, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def rank_zero_only(function: Callable[..., T]) -> Callable[..., Optional[T]]:
    """``function`` on global rank 0; on the other ranks the call does nothing and returns None."""

    @functools.wraps(function)
    def on_rank_zero(*args: Any, **kwargs: Any) -> Optional[T]:
        if global_rank() == 0:
            return function(*args, **kwargs)
        return None

    return on_rank_zero


class DummyExperiment:
    """What a logger's ``experiment`` is on ranks other than 0: every method call does nothing.

    ``logger.experiment.add_text(...)`` on every rank therefore writes once, from rank 0;
    ``experiment[0]`` is the stand-in again.
    """

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return self._nothing

    def __getitem__(self, index: Any) -> "DummyExperiment":
        return self

    def __setitem__(self, index: Any, value: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "DummyExperiment()"


def rank_zero_experiment(getter: Callable[[Any], T]) -> Callable[[Any], Any]:
    """For a logger's ``experiment`` property: the real object on rank 0, a :class:`DummyExperiment` elsewhere
    (so no other rank creates folders or event files)."""

    @functools.wraps(getter)
    def experiment(self: Any) -> Any:
        if global_rank() != 0:
            return DummyExperiment()
        return getter(self)

    return experiment
