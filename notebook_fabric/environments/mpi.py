"""Ranks started by ``mpirun``/``mpiexec`` (OpenMPI, MPICH, Intel MPI, MVAPICH).

mpi4py is optional: when it is installed, rank 0's host name and a free port on it are
broadcast over MPI; otherwise ``MASTER_ADDR``/``MASTER_PORT`` are used, with defaults that only
work on one machine.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from typing import Optional

from ._variables import check_rank, first_set, port_from_job_id, read_int, read_port
from .scheduled import SchedulerEnvironment
from .local import find_free_port

_WHO = "MPIEnvironment"
_HINT = "mpirun/mpiexec sets it for every rank; or pass another ClusterEnvironment in Fabric(plugins=[...])."

# Each tuple: the variables of OpenMPI, MPICH / Intel MPI (Hydra), MVAPICH, tried in that order.
WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
#: per-job identifiers every rank shares; hashed into a default port when ``MASTER_PORT`` is unset
JOB_ID_VARIABLES = ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMI_KVSNAME")
DEFAULT_PORT = 29500


def mpi4py_available() -> bool:
    """Whether mpi4py can be imported (it is an optional dependency)."""
    return importlib.util.find_spec("mpi4py") is not None


def _check_pair(rank_variables: tuple[str, ...], rank: int, size_variables: tuple[str, ...], size: int) -> None:
    """``check_rank`` naming the variables this MPI flavour actually set."""
    check_rank(first_set(rank_variables) or rank_variables[0], rank, first_set(size_variables) or size_variables[0], size)


class MPIEnvironment(SchedulerEnvironment):
    """The job shape the MPI launcher exported to this rank.

    The node rank is ``global_rank // local_world_size`` (block placement, mpirun's default).
    Main address: ``MASTER_ADDR``, else rank 0's host name broadcast with mpi4py, else
    ``127.0.0.1`` when every rank is on this machine (a multi-node job without either is a
    ``ValueError`` that says what to set). Main port: ``MASTER_PORT``, else a free port on rank 0
    broadcast with mpi4py, else one derived from the MPI job id, else 29500.
    """

    def __init__(self) -> None:
        self._world_size = read_int(WORLD_SIZE_VARIABLES, _WHO, _HINT, minimum=1)
        self._global_rank = read_int(RANK_VARIABLES, _WHO, _HINT)
        _check_pair(RANK_VARIABLES, self._global_rank, WORLD_SIZE_VARIABLES, self._world_size)
        self._local_rank = read_int(LOCAL_RANK_VARIABLES, _WHO, _HINT)
        self._local_world_size = read_int(LOCAL_SIZE_VARIABLES, _WHO, _HINT, minimum=1)
        _check_pair(LOCAL_RANK_VARIABLES, self._local_rank, LOCAL_SIZE_VARIABLES, self._local_world_size)
        self._rendezvous: Optional[tuple[str, int]] = None

    @property
    def main_address(self) -> str:
        return self._resolve_rendezvous()[0]

    @property
    def main_port(self) -> int:
        return self._resolve_rendezvous()[1]

    def _resolve_rendezvous(self) -> tuple[str, int]:
        """Work out (address, port) once. With mpi4py this is collective: every rank must ask."""
        if self._rendezvous is None:
            address = os.environ.get("MASTER_ADDR")
            port = read_port("MASTER_PORT")
            if (address is None or port is None) and mpi4py_available():
                address, port = self._broadcast_from_rank_zero(address, port)
            if address is None:
                if self._world_size > self._local_world_size:
                    raise ValueError(
                        f"This MPI job spans {self._world_size // self._local_world_size} nodes, so rank 0's"
                        " address must be known: export MASTER_ADDR=<rank 0's host> to every rank"
                        " (e.g. `mpirun -x MASTER_ADDR=node1 ...`) or `pip install mpi4py`."
                    )
                address = "127.0.0.1"
            if port is None:
                job_variable = first_set(JOB_ID_VARIABLES)
                port = port_from_job_id(os.environ[job_variable]) if job_variable else DEFAULT_PORT
            self._rendezvous = (address, port)
        return self._rendezvous

    def _broadcast_from_rank_zero(self, address: Optional[str], port: Optional[int]) -> tuple[str, int]:
        from mpi4py import MPI  # optional dependency, imported only when installed

        proposal = None
        if self._global_rank == 0:
            proposal = (address or socket.gethostname(), port or find_free_port("0.0.0.0"))
        return MPI.COMM_WORLD.bcast(proposal, root=0)

    @staticmethod
    def detect() -> bool:
        """True in a rank started by an MPI launcher (OpenMPI, MPICH/Intel MPI or MVAPICH variables)."""
        return first_set(WORLD_SIZE_VARIABLES) is not None and first_set(RANK_VARIABLES) is not None

    def node_rank(self) -> int:
        return self._global_rank // self._local_world_size

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """``ValueError`` when Fabric's devices x num_nodes is not the MPI world size."""
        if num_devices * num_nodes != self._world_size:
            raise ValueError(
                f"Fabric(devices={num_devices}, num_nodes={num_nodes}) asks for {num_devices * num_nodes}"
                f" ranks but mpirun started {self._world_size} ({self._local_world_size} on this node)."
                f" Use `mpirun -np {num_devices * num_nodes}` with {num_devices} per node, or set devices"
                f" and num_nodes to match."
            )

