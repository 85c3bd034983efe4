"""Started by `notebook-fabric run`: a Fabric with no arguments, one all_reduce, one line per rank.

Usage: cli_allreduce.py [--fail-rank N] [--pid-dir DIR]
  --fail-rank N   rank N exits with code 3 after the all_reduce; the others sleep until ended
  --pid-dir DIR   every rank writes its pid to DIR/rank<R>.pid first
"""
import argparse
import os
import sys
import time

import torch

from notebook_fabric import Fabric

parser = argparse.ArgumentParser()
parser.add_argument("--fail-rank", type=int, default=None)
parser.add_argument("--pid-dir", default=None)
options = parser.parse_args()

fabric = Fabric()
fabric.launch()
if options.pid_dir:
    with open(os.path.join(options.pid_dir, f"rank{fabric.global_rank}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
environment = fabric.strategy.cluster_environment
sys.stdout.write(  # one write per line, so the ranks' lines never interleave
    f"RESULT global_rank={fabric.global_rank} world_size={fabric.world_size}"
    f" local_rank={fabric.local_rank} node_rank={fabric.node_rank} sum={total.item():g}"
    f" env={type(environment).__name__} external={environment.creates_processes_externally}"
    f" strategy={type(fabric.strategy).__name__} devices={fabric.strategy.num_processes}\n"
)
sys.stdout.flush()
if options.fail_rank is not None:
    if fabric.global_rank == options.fail_rank:
        print(f"rank {fabric.global_rank} fails on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    time.sleep(600)  # torchrun must end this rank when rank N fails
