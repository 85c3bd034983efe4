"""Where ranks come from: notebook-fabric's own launcher, torchrun, SLURM or MPI.

``detect_environment()`` picks the first environment in ``ENVIRONMENTS`` whose ``detect()`` is
true; the connector uses it when ``Fabric(plugins=...)`` names no ``ClusterEnvironment``.
Subclass ``ClusterEnvironment`` to support another scheduler.
"""
from __future__ import annotations

from .base import ClusterEnvironment
from .local import LocalEnvironment, find_free_port
from .mpi import MPIEnvironment
from .slurm import SLURMEnvironment, parse_node_list
from .torchelastic import TorchElasticEnvironment

#: detection order: the most specific launcher first; torchrun inside a SLURM job is torchrun's
ENVIRONMENTS: tuple[type[ClusterEnvironment], ...] = (
    TorchElasticEnvironment,
    SLURMEnvironment,
    MPIEnvironment,
    LocalEnvironment,
)


def detect_environment() -> ClusterEnvironment:
    """An instance of the first environment in ``ENVIRONMENTS`` that detects itself.

    ``LocalEnvironment`` always detects, so this never fails to find one; it raises
    ``ValueError`` (naming the variable) when a detected scheduler's variables are inconsistent.
    """
    for environment in ENVIRONMENTS:
        if environment.detect():
            return environment()
    return LocalEnvironment()


__all__ = [
    "ClusterEnvironment",
    "LocalEnvironment",
    "TorchElasticEnvironment",
    "SLURMEnvironment",
    "MPIEnvironment",
    "detect_environment",
    "ENVIRONMENTS",
    "find_free_port",
    "parse_node_list",
]
