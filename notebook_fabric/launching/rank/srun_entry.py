"""Entry point of a rank that Slurm's ``srun`` started on some host: become the rank ``SLURM_PROCID`` names.

The notebook's parcel (:class:`~notebook_fabric.clusters.slurm_hosts.SrunParcel`) arrives on stdin
(srun ``--input=all`` gives every task the same bytes; the key never is on a command line or in an
environment). The rank's place comes from Slurm through :class:`SLURMEnvironment`; the channel goes
through a :class:`~notebook_fabric.clusters.tls.LoopbackTunnel` (TLS to the notebook) when the
parcel carries a certificate; gloo and NCCL use the interface that routes to the notebook.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import sys


def main() -> None:
    parcel = pickle.load(sys.stdin.buffer)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    from ...clusters.interfaces import interface_toward
    from ...clusters.tls import LoopbackTunnel, PoolCertificate
    from ...environments.slurm import SLURMEnvironment
    from .main import rank_entry

    slurm = SLURMEnvironment()
    rank = slurm.global_rank()
    template = parcel.bootstrap
    address = tuple(template.address)
    if parcel.certificate is not None:
        address = LoopbackTunnel(address, PoolCertificate(parcel.certificate, parcel.key), rank).address
    env = dict(template.env)
    env.update(RANK=str(rank), LOCAL_RANK=str(slurm.local_rank()), LOCAL_WORLD_SIZE=str(slurm.local_world_size()),
               NODE_RANK=str(slurm.node_rank()), GROUP_RANK=str(slurm.node_rank()),
               WORLD_SIZE=str(slurm.world_size()), NOTEBOOK_FABRIC_HOST=socket.gethostname())
    interface = interface_toward(env["MASTER_ADDR"]).name
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.setdefault(name, os.environ.get(name, interface))
    bootstrap = dataclasses.replace(template, rank=rank, world_size=slurm.world_size(), address=address,
                                    parent_pid=os.getppid(), start_method="spawn", env=env, close_ports=())
    rank_entry(bootstrap, None)


if __name__ == "__main__":
    main()
