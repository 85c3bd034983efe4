"""How a Fabric's ranks start: one small interface, four launchers, and the one function that picks.

A launcher's ``launch(fn, args, kwargs, options)`` brings the ranks into being and runs
``fn(fabric, *args, **kwargs)`` where the user's code runs: on every rank (pool, XLA) or in this
process once it is a rank (script re-run, this process only). ``fn`` may be ``None`` only where
this process is itself a rank. A launcher is built from the strategy (how many ranks, where) and a
:class:`RankRecipe` (how a process becomes a rank); it never reads the Fabric's attributes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

from ..strategies.start_methods import RankSource, traits_of
from .options import LaunchOptions

Function = Optional[Callable[..., Any]]


@dataclass(frozen=True)
class RankRecipe:
    """What a launcher is handed by the Fabric it starts ranks for (never the Fabric's insides).

    ``fabric``: this process' Fabric (``fn`` gets it where this process is a rank); ``prepare(fabric)``
    makes a Fabric a working rank (process group, debug checks) once its process is one;
    ``rebuild``: the constructor arguments a new rank process builds the same Fabric from;
    ``build(rebuild)``: in a new rank, that Fabric, prepared.
    """

    fabric: Any
    prepare: Callable[[Any], None]
    rebuild: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], Any]


class Launcher(Protocol):
    """What ``Fabric.launch`` needs from whatever starts the ranks."""

    @property
    def is_interactive_compatible(self) -> bool:
        """Whether it works from a notebook or a REPL (where there is no script to run again)."""

    def launch(self, fn: Function, args: tuple, kwargs: dict, options: LaunchOptions) -> Any:
        """Start the ranks, run ``fn(fabric, *args, **kwargs)``; return this process' or rank 0's value."""


class ThisProcessLauncher:
    """No ranks to start (one process, or ranks created outside): prepare this one and call ``fn``."""

    is_interactive_compatible = True

    def __init__(self, strategy: Any, recipe: RankRecipe) -> None:
        self._strategy = strategy
        self._recipe = recipe

    def launch(self, fn: Function, args: tuple, kwargs: dict, options: LaunchOptions) -> Any:
        self._recipe.prepare(self._recipe.fabric)
        return fn(self._recipe.fabric, *args, **kwargs) if fn is not None else None


class ScriptRerunLauncher(ThisProcessLauncher):
    """``strategy="ddp"`` in a script: re-run the script for the other ranks; this process is local rank 0."""

    is_interactive_compatible = False

    def launch(self, fn: Function, args: tuple, kwargs: dict, options: LaunchOptions) -> Any:
        from .rerun_script import start_script_ranks

        strategy = self._strategy
        if fn is not None and strategy.num_nodes > 1 and _no_script_to_rerun():
            raise RuntimeError(
                f"Fabric(num_nodes={strategy.num_nodes}).launch(fn) here has no script to run on other hosts: for"
                f" ranks on {strategy.num_nodes} hosts from a notebook, name the cluster that places them:"
                f" notebook_fabric.launch(fn, devices={strategy.num_processes}, num_nodes={strategy.num_nodes},"
                f" cluster='slurm'), or %%fabric --devices {strategy.num_processes} --num-nodes {strategy.num_nodes}"
                " --cluster slurm"
            )
        start_script_ranks(strategy.num_processes, strategy.num_nodes, strategy.node_rank, strategy.cluster_environment)
        return super().launch(fn, args, kwargs, options)


class PoolLauncher:
    """A supervised pool of rank processes (``run_function``) that runs ``fn`` and nothing else."""

    is_interactive_compatible = True

    def __init__(self, strategy: Any, recipe: RankRecipe, start_method: Optional[str]) -> None:
        self._strategy = strategy
        self._recipe = recipe
        self._start_method = start_method  # None: fork where safe, else spawn

    def launch(self, fn: Function, args: tuple, kwargs: dict, options: LaunchOptions) -> Any:
        if fn is None:
            raise RuntimeError(
                f"strategy={type(self._strategy).__name__}(start_method={self._start_method!r}) runs a"
                " function on each rank: call fabric.launch(train_fn) with a function taking `fabric` first,"
                " or use strategy='ddp' in a script."
            )
        from .api import run_function

        return run_function(self._recipe.rebuild, fn, args, kwargs, make_fabric=self._recipe.build,
                            num_processes=int(getattr(self._strategy, "num_processes", 1) or 1),
                            start_method=self._start_method, options=options)


class XLALauncher:
    """torch_xla's own launcher (``xmp.spawn``): one process per XLA device, each running ``fn``."""

    is_interactive_compatible = True  # xmp.spawn forks: nothing needs to be importable by name
    #: options a rank pool honours that torch_xla's launcher cannot
    NOT_APPLICABLE = ("return_all", "timeout", "start_method", "log_dir")

    def __init__(self, strategy: Any, recipe: RankRecipe) -> None:
        self._strategy = strategy
        self._recipe = recipe

    def launch(self, fn: Function, args: tuple, kwargs: dict, options: LaunchOptions) -> Any:
        strategy = self._strategy
        if fn is None:
            raise RuntimeError(
                f"{type(strategy).__name__}'s ranks are started by torch_xla: call fabric.launch(train_fn)"
                " with a function taking `fabric` first"
            )
        given = [name for name in self.NOT_APPLICABLE if name in options.changed()]
        if given:
            raise ValueError(f"XLA strategies start their ranks with torch_xla: {'=, '.join(given)}= do not apply")
        from .xla_ranks import start_xla_ranks

        recipe = self._recipe
        return start_xla_ranks(strategy, run_on_xla_rank, (recipe.prepare, recipe.fabric, fn, args, kwargs))


#: who starts the ranks of each rank source of the start-method table (a new source: a row there, a launcher here)
LAUNCHERS: Mapping[RankSource, Callable[..., Launcher]] = {
    RankSource.SCRIPT: lambda strategy, recipe, row: ScriptRerunLauncher(strategy, recipe),
    RankSource.POOL: lambda strategy, recipe, row: PoolLauncher(strategy, recipe, start_method=row.name),
    RankSource.XLA: lambda strategy, recipe, row: XLALauncher(strategy, recipe),
}


def select_launcher(strategy: Any, recipe: RankRecipe, runs_a_function: bool, *,
                    fresh_processes: bool = False) -> Launcher:
    """The launcher for ``strategy``, read from the start-method table (``LAUNCHERS`` by rank source).

    A script strategy (``popen``) given a function on one node runs it in a pool instead: several
    nodes started by hand keep re-running the script (a local pool cannot hold the other nodes' ranks).
    ``fresh_processes`` (``launch(fn)``): a function runs in rank processes even where this process
    could be the only rank. In an interactive session (a notebook, IPython, ``python -i``) a launcher
    that is not ``is_interactive_compatible`` is refused here, before anything starts.
    """
    launcher = _pick_launcher(strategy, recipe, runs_a_function, fresh_processes)
    if not launcher.is_interactive_compatible and running_interactively():
        raise RuntimeError(
            f"fabric.launch() without a function re-runs the script for the other ranks of"
            f" strategy={type(strategy).__name__}, but this is an interactive session (a notebook or"
            " a REPL) with no script to run again. Call fabric.launch(train_fn) with a function taking"
            " `fabric` first, or use strategy='ddp_notebook'."
        )
    return launcher


def running_interactively() -> bool:
    """A notebook kernel, an IPython shell, the plain REPL or ``python -i``: no script to re-run."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    try:
        return ipython is not None and ipython.get_ipython() is not None
    except Exception:  # noqa: BLE001 - a broken IPython is no shell
        return False


def _pick_launcher(strategy: Any, recipe: RankRecipe, runs_a_function: bool, fresh_processes: bool) -> Launcher:
    row = traits_of(strategy.start_method)
    if row is not None and row.source is RankSource.XLA:
        return LAUNCHERS[RankSource.XLA](strategy, recipe, row)
    if not _needs_new_ranks(strategy):
        if fresh_processes and runs_a_function and not _created_outside(strategy):
            return PoolLauncher(strategy, recipe, start_method=row.name if _is_pool(row) else None)
        return ThisProcessLauncher(strategy, recipe)
    if strategy.start_method is None:  # a parallel strategy that declares nothing: a pool, fork where safe
        return PoolLauncher(strategy, recipe, start_method=None)
    if row is None:
        return ThisProcessLauncher(strategy, recipe)
    if row.source is RankSource.SCRIPT and runs_a_function and strategy.num_nodes == 1:
        return PoolLauncher(strategy, recipe, start_method=None)
    return LAUNCHERS[row.source](strategy, recipe, row)


def _is_pool(row: Any) -> bool:
    return row is not None and row.source is RankSource.POOL


def _created_outside(strategy: Any) -> bool:
    environment = getattr(strategy, "cluster_environment", None)
    return environment is not None and environment.creates_processes_externally


def _needs_new_ranks(strategy: Any) -> bool:
    from ..strategies import ParallelStrategy

    return isinstance(strategy, ParallelStrategy) and strategy.world_size > 1 and not _created_outside(strategy)


def run_on_xla_rank(prepare: Callable[[Any], None], fabric: Any, function: Callable[..., Any], args: tuple,
                    kwargs: dict) -> Any:
    """Inside one XLA rank (a process torch_xla started): prepare the rank as every launcher does
    (process group, debug checks), then run the user's function."""
    prepare(fabric)
    return function(fabric, *args, **kwargs)


def _no_script_to_rerun() -> bool:
    """A notebook or a REPL: ``__main__`` is no file another host could run."""
    import sys

    return getattr(sys.modules.get("__main__"), "__file__", None) is None
