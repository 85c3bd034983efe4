"""Entry point of a rank that Slurm's ``srun`` started on some host: become the rank ``SLURM_PROCID`` names.

The notebook's parcel (:class:`~notebook_fabric.clusters.slurm_hosts.SrunParcel`) arrives on stdin
(srun ``--input=all`` gives every task the same bytes; the key never is on a command line or in an
environment). The rank's place comes from Slurm through :class:`SLURMEnvironment`; gloo and NCCL use
the interface that routes to the notebook.

Off loopback the channel goes through a :class:`~notebook_fabric.clusters.tls.LoopbackTunnel` held
by this process, which forks the rank and stays above it: the rank's last events (a result, then
``os._exit``) are still carried after it is gone, and this process then ends as the rank did (the
same exit code, or killed by the same signal), so srun reports the rank's own end. SIGINT and
SIGTERM reach the rank from Slurm directly (``scancel --signal`` signals every process of the step);
this process ignores them and dies with the rank.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import signal
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
    env = dict(template.env)
    env.update(RANK=str(rank), LOCAL_RANK=str(slurm.local_rank()), LOCAL_WORLD_SIZE=str(slurm.local_world_size()),
               NODE_RANK=str(slurm.node_rank()), GROUP_RANK=str(slurm.node_rank()),
               WORLD_SIZE=str(slurm.world_size()), NOTEBOOK_FABRIC_HOST=socket.gethostname())
    interface = interface_toward(env["MASTER_ADDR"]).name
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.setdefault(name, os.environ.get(name, interface))
    if template.log_dir:  # a host that does not share the notebook's file system keeps the rank's logs locally
        os.makedirs(os.path.join(template.log_dir, f"rank{rank}"), exist_ok=True)
    os.environ["NOTEBOOK_FABRIC_HOST"] = env["NOTEBOOK_FABRIC_HOST"]  # the rank says where it runs (dashboard, errors)
    bootstrap = dataclasses.replace(template, rank=rank, world_size=slurm.world_size(), parent_pid=os.getpid(),
                                    start_method="spawn", env=env, close_ports=())
    if parcel.certificate is None:  # loopback: no tunnel, this process is the rank
        rank_entry(dataclasses.replace(bootstrap, parent_pid=os.getppid()), None)
    tunnel = LoopbackTunnel(tuple(template.address), PoolCertificate(parcel.certificate, parcel.key), rank)
    bootstrap = dataclasses.replace(bootstrap, address=tunnel.address)
    child = os.fork()
    if child == 0:
        tunnel.socket.close()
        rank_entry(bootstrap, None)
    _stay_above(child, tunnel)


def _stay_above(child: int, tunnel: "object") -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    tunnel.serve()
    _, status = os.waitpid(child, 0)
    tunnel.finish()
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # end as the rank did: srun then reports "Killed", "Segmentation fault", ...
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if __name__ == "__main__":
    main()
