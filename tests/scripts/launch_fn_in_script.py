"""``python launch_fn_in_script.py STRATEGY``: work first, then ``Fabric(strategy=...).launch(run)``.

No main guard on purpose: the script's module-level code must run once, in this process only, and
``run`` (defined in ``__main__``) must reach the ranks. Every run of the module-level code appends
a line to ``module_runs.txt`` in the working folder; the result comes back as one NFTEST line.
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core_common import emit  # noqa: E402

from notebook_fabric import Fabric  # noqa: E402

with open("module_runs.txt", "a") as log:
    log.write(f"{os.getpid()}\n")

# the work before launch: a single-device reference step (what crashed rank 1 when the script was re-run)
reference = Fabric(accelerator="cpu", devices=1)
torch.manual_seed(0)
reference_model = reference.setup(nn.Linear(4, 1))
reference_value = float(reference_model(torch.ones(1, 4)).sum().detach())


def run(fabric, offset):
    total = fabric.all_reduce(torch.tensor([float(fabric.global_rank + 1)]), reduce_op="sum")
    return {"rank": fabric.global_rank, "world_size": fabric.world_size, "total": float(total[0]) + offset,
            "pid": os.getpid(), "strategy": type(fabric.strategy).__name__}


def keep_as_is(model, device_mesh):  # the parallelize function model_parallel needs (defined in __main__ too)
    return model


strategy = sys.argv[1]
if strategy == "model_parallel":
    from notebook_fabric.strategies.model_parallel import ModelParallelStrategy

    strategy = ModelParallelStrategy(parallelize_fn=keep_as_is)
fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
result = fabric.launch(run, 100)
emit(0, "launched", result=result, parent_pid=os.getpid(), reference=reference_value,
     module_runs=open("module_runs.txt").read().split())
