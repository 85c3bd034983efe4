"""Ranks on two Slurm hosts (the test bed: scripts/slurm_testbed.sh up), against their floors.

1. call-to-result of ``launch(fn, devices=1, num_nodes=2, cluster="slurm")`` (fn: one all_reduce) vs
   the floor, ``srun -N2`` of a script doing ``init_process_group`` + one all_reduce;
2. a warm task on a pool over 2 hosts (what a warm ``%%fabric`` cell costs beyond the cell) vs the
   same on a local pool of 2 ranks;
3. ``--calls`` small all_reduces across the hosts: ``fabric.all_reduce`` (with the ledger tracer the
   pool's ranks install, and without any tracer) vs raw ``dist.all_reduce``, in the same ranks,
   interleaved; wall time and the calling thread's CPU time per call.

    .venv/bin/python benchmarks/multi_host.py --rounds 5 --calls 10000
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time

FLOOR = textwrap.dedent('''
    import os, socket, torch, torch.distributed as dist
    from notebook_fabric.environments.slurm import parse_node_list
    os.environ["MASTER_ADDR"] = socket.gethostbyname(parse_node_list(os.environ["SLURM_JOB_NODELIST"])[0])
    os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "nf0")
    dist.init_process_group("gloo", init_method="env://", rank=int(os.environ["SLURM_PROCID"]),
                            world_size=int(os.environ["SLURM_NTASKS"]))
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()
    dist.destroy_process_group()
''')


def one_all_reduce(fabric):
    import torch

    return float(fabric.all_reduce(torch.ones(1), reduce_op="sum"))


def many_all_reduces(fabric, calls: int, rounds: int):
    """Per round, each variant's wall and calling-thread CPU seconds for ``calls`` all_reduces: raw
    ``dist.all_reduce``, ``fabric.all_reduce`` with the ledger tracer the pool's ranks install, and
    ``fabric.all_reduce`` with no tracer (what the ledger adds is the difference). The order turns
    round by round, so drift hits every variant alike."""
    import torch
    import torch.distributed as dist
    from notebook_fabric.collectives import trace

    ledger = trace.get_tracer()
    tensor = torch.ones(4)
    names = ["raw", "fabric", "fabric, no tracer"]
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            trace.set_tracer(None if name == "fabric, no tracer" else ledger)
            fabric.barrier()
            started, started_cpu = time.perf_counter(), time.thread_time()
            if name == "raw":
                for _ in range(calls):
                    dist.all_reduce(tensor)
            else:
                for _ in range(calls):
                    fabric.all_reduce(tensor, reduce_op="sum")
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.thread_time() - started_cpu)
    trace.set_tracer(ledger)
    return {"wall": times, "cpu": cpu}


def floor_launch() -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    started = time.perf_counter()
    subprocess.run(["srun", "-N2", "--ntasks-per-node=1", sys.executable, "-c", FLOOR], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def our_launch() -> float:
    from notebook_fabric import launch

    started = time.perf_counter()
    value = launch(one_all_reduce, devices=1, num_nodes=2, cluster="slurm", accelerator="cpu", dashboard=False)
    assert value == 2.0
    return time.perf_counter() - started


def warm_tasks(pool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pool.run(lambda fabric, namespace: fabric.global_rank)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--warm-repeats", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    floors, ours = [], []
    for _ in range(args.rounds):
        floors.append(floor_launch())
        ours.append(our_launch())
    f, o = statistics.median(floors), statistics.median(ours)
    print(f"launch over 2 hosts: srun floor {f:.2f} s, launch(cluster='slurm') {o:.2f} s, ratio {o / f:.2f}x "
          f"(paired median {statistics.median(b / a for a, b in zip(floors, ours)):.2f}x)")

    from notebook_fabric.clusters.slurm_hosts import SlurmHosts
    from notebook_fabric.clusters.spec import Slurm
    from notebook_fabric.fabric import build_rank_fabric
    from notebook_fabric.launching.pool import RankPool
    from notebook_fabric.live.sinks import NullSink

    remote = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 1, "num_nodes": 2}, 2, start_method="spawn",
                      make_fabric=build_rank_fabric, hosts=SlurmHosts(Slurm(), 2, 1), sink=NullSink()).start()
    local = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 2}, 2, start_method="spawn",
                     make_fabric=build_rank_fabric, sink=NullSink()).start()
    try:
        pairs = [(warm_tasks(local, args.warm_repeats), warm_tasks(remote, args.warm_repeats)) for _ in range(3)]
        lw, rw = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"warm task: local pool {lw * 1e3:.1f} ms, pool over 2 hosts {rw * 1e3:.1f} ms, +{(rw - lw) * 1e3:.1f} ms")
        measured = remote.run(lambda fabric, namespace: many_all_reduces(fabric, args.calls, args.rounds))[0]
        per_call = {kind: {name: statistics.median(values) / args.calls * 1e6 for name, values in by_name.items()}
                    for kind, by_name in measured.items()}
        wall, cpu = per_call["wall"], per_call["cpu"]
        paired = statistics.median(f / r for f, r in zip(measured["wall"]["fabric"], measured["wall"]["raw"]))
        print(f"{args.calls} all_reduce(float32[4]) across 2 hosts, us/call wall (rank 0's CPU): raw {wall['raw']:.0f}"
              f" ({cpu['raw']:.0f}), Fabric {wall['fabric']:.0f} ({cpu['fabric']:.0f}), Fabric without the ledger"
              f" tracer {wall['fabric, no tracer']:.0f} ({cpu['fabric, no tracer']:.0f}); Fabric/raw"
              f" {wall['fabric'] / wall['raw']:.3f}x (paired median {paired:.3f}x)")
    finally:
        remote.stop()
        local.stop()


if __name__ == "__main__":
    main()
