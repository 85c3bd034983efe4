"""A big tensor argument under ``ddp_spawn``: shared memory (the default) vs a copy in the payload.

``fabric.launch(fn, tensor)`` on 2 spawned CPU ranks, each reading one element. The copy variant
is what ranks on other hosts get (``LocalHosts.shares_memory`` off). Interleaved round by round;
reports the median wall time, the notebook's CPU and the ranks' CPU (reaped children) per launch,
and the payload's size and pickling CPU for each way.

    .venv/bin/python benchmarks/shared_arguments.py --megabytes 256 --rounds 5
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Dict, List, Tuple

import torch

from notebook_fabric import Fabric
from notebook_fabric.launching.hosts import LocalHosts
from notebook_fabric.utilities import by_value, shared_tensors
from notebook_fabric.utilities.shared_tensors import SharedTensors


def cpu_seconds() -> Tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def read_one_element(fabric: Fabric, tensor: torch.Tensor) -> float:
    return float(tensor[fabric.global_rank])


def payload_costs(megabytes: int) -> None:
    tensor = torch.rand(megabytes * 2**20 // 4)
    for name, dumps in (("copy", by_value.dumps), ("shared (first)", shared_tensors.dumps),
                        ("shared (again)", shared_tensors.dumps)):
        before = cpu_seconds()[0]
        size = len(dumps(SharedTensors(((tensor,), {}))))
        print(f"payload {name:15s}: {size:>12,d} bytes, {1000 * (cpu_seconds()[0] - before):7.1f} ms CPU to pickle")


def launches(megabytes: int, rounds: int) -> None:
    tensor = torch.rand(megabytes * 2**20 // 4)
    measured: Dict[bool, List[Tuple[float, float, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for share in (False, True):
            LocalHosts.shares_memory = share
            argument = tensor.clone()
            own, ranks = cpu_seconds()
            started = time.monotonic()
            Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(read_one_element, argument,
                                                                                dashboard=False)
            wall = time.monotonic() - started
            own_after, ranks_after = cpu_seconds()
            measured[share].append((wall, own_after - own, ranks_after - ranks))
    LocalHosts.shares_memory = True
    for share, rows in measured.items():
        wall, own, ranks = (statistics.median(column) for column in zip(*rows))
        print(f"{'shared' if share else 'copied'}: median wall {wall:.2f} s, notebook CPU {own:.2f} s, ranks CPU {ranks:.2f} s"
              f" ({rounds} launches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    payload_costs(options.megabytes)
    launches(options.megabytes, options.rounds)


if __name__ == "__main__":
    main()
