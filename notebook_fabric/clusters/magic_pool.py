"""The ``%%fabric --cluster slurm`` pool's hosts: what the magic's session asks before it builds the pool."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from .fabric_check import check_fabric_arguments, check_gpus
from .slurm_hosts import SlurmHosts
from .spec import Slurm, resolve_cluster


def cluster_hosts(settings: Any, notify: Callable[[str], None]) -> Tuple[int, Optional[str], SlurmHosts]:
    """``(ranks, start method, hosts)`` for pool settings with ``cluster`` set (``devices`` ranks on each of
    ``num_nodes`` hosts); the hosts are allocated here, and given back when the pool stops."""
    spec = resolve_cluster(settings.cluster)
    if spec is None:
        raise ValueError(f"cluster={settings.cluster!r} places no hosts")
    if settings.partition is not None:
        spec = Slurm(**{**spec.__dict__, "partition": settings.partition})
    if settings.start_method not in (None, "spawn"):
        raise ValueError(f"--start-method {settings.start_method} does not apply to ranks on a cluster's hosts"
                         " (each starts in a fresh interpreter there)")
    fabric_kwargs = settings.fabric_kwargs()
    check_fabric_arguments(fabric_kwargs, settings.devices * settings.num_nodes)
    check_gpus(fabric_kwargs, settings.devices, spec.gpus_per_node)
    hosts = SlurmHosts(spec, settings.num_nodes, settings.devices, notify=notify)
    return settings.devices * settings.num_nodes, "spawn", hosts
