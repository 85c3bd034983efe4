"""Ranks on hosts that Slurm places: :class:`SlurmHosts`, the Slurm implementation of :class:`~notebook_fabric.launching.hosts.RankHosts`.

1. the hosts: the kernel's own allocation, or a new one (:mod:`.slurm_allocation`), checked first;
2. the notebook's address: the interface that routes to the first host (``Slurm(interface=)``
   overrides); the channel and the rendezvous listen there only, the channel behind TLS with a
   certificate made for this pool (loopback needs none);
3. the ranks: one ``srun`` step (:mod:`.slurm_step`) of ``devices`` tasks per host, each started by
   :mod:`notebook_fabric.launching.rank.srun_entry`, which reads its rank from ``SLURM_PROCID``.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from ..launching.protocol import RankBootstrap, RankSetup
from ..launching.rendezvous import RendezvousStore
from ..live.channel import EventListener
from .interfaces import Interface, interface_named, interface_toward
from .remote_channel import TLSChannel
from .slurm_allocation import Allocation, check_tools, current_allocation, request_allocation
from .slurm_step import SlurmRank, SrunStep
from .spec import Slurm
from .tls import PoolCertificate


@dataclass(frozen=True)
class SrunParcel:
    """What every task of the step reads from stdin: the bootstrap (rank fields filled in by the
    task) and the pool's certificate and key (``None`` on loopback)."""

    bootstrap: RankBootstrap
    certificate: Optional[bytes]
    key: Optional[bytes]


class SlurmHosts:
    """``num_nodes`` Slurm hosts with ``devices`` ranks each; see the module docstring.

    Constructing it gets the hosts (and may raise :class:`~.slurm_allocation.SlurmError`); nothing
    runs on them until :meth:`start_ranks`. :meth:`close` ends the step and gives back an allocation
    of our own."""

    def __init__(self, spec: Slurm, num_nodes: int, devices: int, notify: Callable[[str], None] = lambda text: None) -> None:
        check_tools()
        self.spec = spec
        self.devices = devices
        self._notify = notify
        self._step: Optional[SrunStep] = None
        self.allocation: Allocation = current_allocation(num_nodes, devices) or request_allocation(spec, num_nodes, devices, notify)
        try:
            self.interface: Interface = (interface_named(spec.interface) if spec.interface
                                         else interface_toward(self.allocation.hosts[0]))
            self._certificate = None if self.interface.is_loopback else PoolCertificate.create()
        except BaseException:
            self.allocation.release()
            raise

    @property
    def hosts(self) -> List[str]:
        return list(self.allocation.hosts)

    def open_channel(self, backlog: int) -> EventListener:
        if self._certificate is None:
            return EventListener(backlog=backlog)
        return TLSChannel(self.interface.address, self._certificate, backlog, on_closed=self._connection_closed)

    def open_rendezvous(self) -> RendezvousStore:
        return RendezvousStore(host=self.interface.address)

    def rank_environment(self, rendezvous: RendezvousStore, rank: int, world_size: int) -> Dict[str, str]:
        """The variables common to every rank; each task adds its own rank's from ``SLURM_*``."""
        return {"MASTER_ADDR": self.interface.address, "MASTER_PORT": str(rendezvous.port),
                "WORLD_SIZE": str(world_size), "TORCHELASTIC_USE_AGENT_STORE": "True"}

    def start_ranks(self, method: str, bootstraps: Sequence[RankBootstrap], setup: RankSetup) -> List[SlurmRank]:
        if method == "fork":
            raise ValueError("ranks on Slurm hosts cannot be forked from the notebook: use start_method='spawn'")
        expected = len(self.allocation.hosts) * self.devices
        if len(bootstraps) != expected:
            raise ValueError(f"{len(bootstraps)} ranks asked of {len(self.allocation.hosts)} Slurm host(s) with"
                             f" {self.devices} each ({expected})")
        parcel = SrunParcel(bootstraps[0], None if self._certificate is None else self._certificate.certificate,
                            None if self._certificate is None else self._certificate.key)
        reach = f"the notebook at {bootstraps[0].address[0]}:{bootstraps[0].address[1]} (interface {self.interface.name})"
        self._step = SrunStep(self.allocation, self.devices, pickle.dumps(parcel), self._notify, reach)
        return [SlurmRank(self._step, rank) for rank in range(expected)]

    def host_of(self, rank: int) -> str:
        return self.allocation.hosts[rank // self.devices]

    def close(self) -> None:
        try:
            if self.allocation.owned:  # cancelling the job ends the step too, at once
                self.allocation.release()
            if self._step is not None:
                self._step.close()
        finally:
            self.allocation.release()

    def _connection_closed(self, rank: int) -> None:
        if self._step is not None and 0 <= rank < self._step.size:
            self._step.connection_closed(rank)
