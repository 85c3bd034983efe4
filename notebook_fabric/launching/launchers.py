"""How a Fabric's ranks start: one small interface, four launchers, and the one function that picks.

A launcher's ``launch(fn, *args, **kwargs)`` brings the ranks into being and runs
``fn(fabric, *args, **kwargs)`` where the user's code runs: on every rank (pool, XLA) or in this
process once it is a rank (script re-run, this process only). ``fn`` may be ``None`` only where
this process is itself a rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from .start_methods import RankSource, traits_of

if TYPE_CHECKING:
    from ..fabric import Fabric

Function = Optional[Callable[..., Any]]


class Launcher(Protocol):
    """What ``Fabric.launch`` needs from whatever starts the ranks."""

    @property
    def is_interactive_compatible(self) -> bool:
        """Whether it works from a notebook or a REPL (where there is no script to run again)."""

    def launch(self, fn: Function, *args: Any, **kwargs: Any) -> Any:
        """Start the ranks, run ``fn(fabric, *args, **kwargs)``; return this process' or rank 0's value."""


class ThisProcessLauncher:
    """No ranks to start (one process, or ranks created outside): prepare this one and call ``fn``."""

    is_interactive_compatible = True

    def __init__(self, fabric: "Fabric") -> None:
        self._fabric = fabric

    def launch(self, fn: Function, *args: Any, **kwargs: Any) -> Any:
        self._fabric._prepare_this_rank()
        return fn(self._fabric, *args, **kwargs) if fn is not None else None


class ScriptRerunLauncher(ThisProcessLauncher):
    """``strategy="ddp"`` in a script: re-run the script for the other ranks; this process is local rank 0."""

    is_interactive_compatible = False

    def launch(self, fn: Function, *args: Any, **kwargs: Any) -> Any:
        from .rerun_script import start_script_ranks

        strategy = self._fabric.strategy
        start_script_ranks(strategy.num_processes, strategy.num_nodes, strategy.node_rank, strategy.cluster_environment)
        return super().launch(fn, *args, **kwargs)


class PoolLauncher:
    """A supervised pool of rank processes (``run_function``) that runs ``fn`` and nothing else."""

    is_interactive_compatible = True

    def __init__(self, fabric: "Fabric", start_method: Optional[str]) -> None:
        self._fabric = fabric
        self._start_method = start_method  # None: fork where safe, else spawn

    def launch(self, fn: Function, *args: Any, **kwargs: Any) -> Any:
        if fn is None:
            raise RuntimeError(
                f"strategy={type(self._fabric.strategy).__name__}(start_method={self._start_method!r}) runs a"
                " function on each rank: call fabric.launch(train_fn) with a function taking `fabric` first,"
                " or use strategy='ddp' in a script."
            )
        from .api import run_function

        return run_function(self._fabric._init_kwargs, fn, args, kwargs=kwargs,
                            num_processes=self._fabric.strategy.num_processes, start_method=self._start_method)


class XLALauncher:
    """torch_xla's own launcher (``xmp.spawn``): one process per XLA device, each running ``fn``."""

    is_interactive_compatible = True  # xmp.spawn forks: nothing needs to be importable by name

    def __init__(self, fabric: "Fabric") -> None:
        self._fabric = fabric

    def launch(self, fn: Function, *args: Any, **kwargs: Any) -> Any:
        strategy = self._fabric.strategy
        if fn is None:
            raise RuntimeError(
                f"{type(strategy).__name__}'s ranks are started by torch_xla: call fabric.launch(train_fn)"
                " with a function taking `fabric` first"
            )
        from .xla_ranks import start_xla_ranks

        self._fabric._launched = True
        return start_xla_ranks(strategy, _run_on_xla_rank, (self._fabric, fn, args, kwargs))


def select_launcher(fabric: "Fabric", runs_a_function: bool) -> Launcher:
    """The launcher for ``fabric``'s strategy, read from the start-method table.

    A script strategy (``popen``) given a function on one node runs it in a pool instead: several
    nodes started by hand keep re-running the script (a local pool cannot hold the other nodes' ranks).
    """
    strategy = fabric.strategy
    row = traits_of(strategy.start_method)
    if row is not None and row.source is RankSource.XLA:
        return XLALauncher(fabric)
    if not _needs_new_ranks(strategy):
        return ThisProcessLauncher(fabric)
    if strategy.start_method is None:  # a parallel strategy that declares nothing: a pool, fork where safe
        return PoolLauncher(fabric, start_method=None)
    if row is None:
        return ThisProcessLauncher(fabric)
    if row.source is RankSource.SCRIPT:
        if runs_a_function and strategy.num_nodes == 1:
            return PoolLauncher(fabric, start_method=None)
        return ScriptRerunLauncher(fabric)
    return PoolLauncher(fabric, start_method=row.name)


def _needs_new_ranks(strategy: Any) -> bool:
    from ..strategies import ParallelStrategy

    environment = getattr(strategy, "cluster_environment", None)
    outside = environment is not None and environment.creates_processes_externally
    return isinstance(strategy, ParallelStrategy) and strategy.world_size > 1 and not outside


def _run_on_xla_rank(fabric: "Fabric", function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Inside one XLA rank (a process torch_xla started): prepare the rank, then run the user's function."""
    fabric._prepare_this_rank()  # the strategy's environment, and debug=True's checks, as on any rank
    return function(fabric, *args, **kwargs)
