"""The start methods: how a strategy's ranks come to exist, in one table beside the strategies.

A strategy declares one (``strategy.start_method``); the launcher that acts on it is picked in
:mod:`notebook_fabric.launching.launchers`. What a method means (who starts the ranks, whether they
inherit this process' memory, which strategy names spell it) is read from this table; the modules
that start processes (``launching/starters.py``, ``preflight.py``, ``rank/main.py``, ``xla_ranks.py``)
also spell ``"spawn"``, ``"fork"`` and ``"forkserver"`` where they hand those names to ``multiprocessing``
or torch_xla.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional, Tuple

#: the values ``strategy.start_method`` and ``start_method=`` may take (``None``: this process only)
StartMethod = Literal["popen", "fork", "spawn", "forkserver", "xla"]


class RankSource(enum.Enum):
    """Who brings a start method's ranks into being."""

    SCRIPT = "the script is run again for every other rank"
    POOL = "a supervised pool of rank processes runs a function"
    XLA = "torch_xla's own launcher runs a function"


@dataclass(frozen=True)
class StartMethodTraits:
    """One row of the table: a start method, where its ranks come from, and its other spellings."""

    name: str
    source: RankSource
    #: words that mean this method at the end of a strategy name (``ddp_notebook`` is forked ranks)
    name_suffixes: Tuple[str, ...] = ()
    #: whether a rank starts as a copy of this process (nothing is pickled; open ports are inherited)
    inherits_memory: bool = False


START_METHOD_TABLE: Mapping[str, StartMethodTraits] = {
    row.name: row
    for row in (
        StartMethodTraits("popen", RankSource.SCRIPT),
        StartMethodTraits("fork", RankSource.POOL, name_suffixes=("fork", "notebook"), inherits_memory=True),
        StartMethodTraits("spawn", RankSource.POOL, name_suffixes=("spawn",)),
        StartMethodTraits("forkserver", RankSource.POOL, name_suffixes=("forkserver",)),
        StartMethodTraits("xla", RankSource.XLA),
    )
}


def start_methods_of(*sources: RankSource) -> Tuple[str, ...]:
    """The names whose ranks come from one of ``sources``, in table order."""
    return tuple(name for name, row in START_METHOD_TABLE.items() if row.source in sources)


#: what a rank pool (``launch(fn)``, ``%%fabric``, ``--start-method``) can start with
POOL_START_METHODS: Tuple[str, ...] = start_methods_of(RankSource.POOL)
#: what ``DDPStrategy(start_method=)`` and the strategies built on its process group accept
PROCESS_GROUP_START_METHODS: Tuple[str, ...] = start_methods_of(RankSource.SCRIPT, RankSource.POOL)


def check_start_method(value: Optional[str], allowed: Iterable[str], *, none_allowed: bool = False) -> None:
    """Raise ``ValueError`` naming the valid choices when ``value`` is not one of ``allowed``."""
    allowed = tuple(allowed)
    if (value is None and none_allowed) or value in allowed:
        return
    raise ValueError(f"start_method={value!r} is not one of {', '.join(repr(name) for name in allowed)}")


def traits_of(start_method: Optional[str]) -> Optional[StartMethodTraits]:
    """The table's row for ``start_method`` (``None`` for none or an unknown name)."""
    return START_METHOD_TABLE.get(start_method) if start_method is not None else None


def is_pool_start_method(start_method: Optional[str]) -> bool:
    row = traits_of(start_method)
    return row is not None and row.source is RankSource.POOL


def inherits_memory(start_method: Optional[str]) -> bool:
    """Whether ranks started this way are copies of this process (so nothing needs pickling)."""
    row = traits_of(start_method)
    return row is not None and row.inherits_memory


def start_method_named_by(strategy_name: str) -> Optional[str]:
    """The start method a strategy name stands for: a registered strategy's declared one, else the
    method an unregistered ``<strategy>_<method>`` name spells (``fsdp_spawn``, ``ddp_notebook``)."""
    from . import STRATEGY_REGISTRY

    name = strategy_name.strip().lower()
    if name in STRATEGY_REGISTRY:
        declared = STRATEGY_REGISTRY.get_init_params(name).get("start_method")
        return declared if declared is not None else getattr(STRATEGY_REGISTRY.get(name), "start_method", None)
    last_word = name.rsplit("_", 1)[-1]
    for row in START_METHOD_TABLE.values():
        if last_word in row.name_suffixes:
            return row.name
    return None
