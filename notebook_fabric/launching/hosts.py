"""The host side of a pool behind one small interface: where ranks dial back, how they start, how they end.

A :class:`RankHosts` starts N ranks with the bootstraps it is given, tells the pool when one ends
(each rank's :class:`~notebook_fabric.launching.starters.RankProcess`: ``exitcode``, ``sentinel``)
and stops them (``terminate``/``kill``, then :meth:`RankHosts.close`). It also says where the
ranks reach the notebook (the channel and the rendezvous, which listen only there) and which host
each rank runs on. :class:`LocalHosts` is today's single machine (fork, spawn, forkserver);
:class:`~notebook_fabric.clusters.slurm_hosts.SlurmHosts` places ranks with Slurm (``clusters/`` sits
above ``launching/`` and implements this seam; ``launching/`` never imports it). A hosts object
whose ``shares_memory`` is true (``LocalHosts``) gets the launch arguments' CPU tensors in shared
memory under spawn and forkserver (:mod:`notebook_fabric.utilities.shared_tensors`); others get copies.
"""
from __future__ import annotations

import socket
from typing import Dict, List, Protocol, Sequence

from .processes import prepare_to_fork
from .protocol import RankBootstrap, RankSetup
from .rendezvous import RendezvousStore
from .starters import RankProcess, start_rank
from ..live.channel import EventListener
from ..utilities import shared_tensors


class RankHosts(Protocol):
    """What a pool needs from whatever places its ranks on hosts."""

    def open_channel(self, backlog: int) -> EventListener:
        """The listener ranks dial back to (its ``address`` is what they are given)."""

    def open_rendezvous(self) -> RendezvousStore:
        """The rendezvous store, listening where the ranks reach it."""

    def rank_environment(self, rendezvous: RendezvousStore, rank: int, world_size: int) -> Dict[str, str]:
        """The torchrun-style variables of ``rank``."""

    def start_ranks(self, method: str, bootstraps: Sequence[RankBootstrap], setup: RankSetup) -> List[RankProcess]:
        """Start one rank per bootstrap; return their processes in rank order. A process whose
        ``channel`` attribute is a connection is connected already (the pool does not wait for it
        to dial back)."""

    def host_of(self, rank: int) -> str:
        """The host ``rank`` runs on."""

    def close(self) -> None:
        """Everything ended: release what holds hosts (an allocation, say). Idempotent."""


class LocalHosts:
    """Ranks on this machine, started by fork, spawn or forkserver; everything on loopback."""

    #: whether the ranks can map this process' shared memory (tensor arguments reach them shared, not
    #: copied): on Linux, unless this process forbids others to open its descriptors
    shares_memory: bool = shared_tensors.processes_here_can_map()

    def __init__(self) -> None:
        self._host = socket.gethostname()

    def open_channel(self, backlog: int) -> EventListener:
        return EventListener(backlog=backlog)

    def open_rendezvous(self) -> RendezvousStore:
        return RendezvousStore()

    def rank_environment(self, rendezvous: RendezvousStore, rank: int, world_size: int) -> Dict[str, str]:
        return rendezvous.rank_environment(rank, world_size)

    def start_ranks(self, method: str, bootstraps: Sequence[RankBootstrap], setup: RankSetup) -> List[RankProcess]:
        started: List[RankProcess] = []
        channels: List[int] = []  # the notebook's ends of the forked ranks' channels so far
        if method == "fork":
            prepare_to_fork()
        try:
            for bootstrap in bootstraps:
                process = start_rank(method, bootstrap, setup, close_in_child=tuple(channels))
                started.append(process)
                channel = getattr(process, "channel", None)
                if channel is not None:
                    channels.append(channel.fileno())
        except BaseException:
            for process in started:  # a rank that could not start: none of the others may outlive the failure
                process.kill()
            raise
        return started

    def host_of(self, rank: int) -> str:
        return self._host

    def close(self) -> None:
        pass
