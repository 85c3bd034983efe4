"""Where ranks run: this machine, or hosts that a cluster's scheduler (Slurm) places them on.

The host side of a pool sits behind :class:`~notebook_fabric.launching.hosts.RankHosts` (start N ranks with these
bootstraps, say when one ends, stop them); :class:`~notebook_fabric.launching.hosts.LocalHosts` and
:class:`~.slurm_hosts.SlurmHosts` implement it. ``cluster=`` takes ``"slurm"`` or :class:`Slurm`.
"""
from .spec import CLUSTER_CHOICES, Slurm, resolve_cluster
from .slurm_allocation import SlurmError

__all__ = ["Slurm", "SlurmError", "resolve_cluster", "CLUSTER_CHOICES"]
