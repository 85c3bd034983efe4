"""After a Fabric DDP run, destroy the default group and create a new one with plain torch.distributed.

``python regroup_after_fabric.py [--rank1-stays-away]``: with the flag, only rank 0 re-creates the
group (with a 4 s timeout), so its rendezvous can never complete.
"""
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from core_common import emit
from notebook_fabric import Fabric

stay_away = "--rank1-stays-away" in sys.argv
fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2)
fabric.launch()
model, optimizer = fabric.setup(torch.nn.Linear(4, 4), torch.optim.SGD(torch.nn.Linear(4, 4).parameters(), lr=0.1))
fabric.backward(model(torch.ones(2, 4)).sum())
fabric.barrier()
rank = fabric.global_rank
dist.destroy_process_group()
if rank == 0:
    time.sleep(2.0)  # rank 1 reaches the new rendezvous first: the order that read the old group's keys
if stay_away and rank == 1:
    time.sleep(12.0)
    sys.exit(0)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=4 if stay_away else 60))
for round_number in range(2):  # a second re-creation meets in a namespace of its own as well
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    emit(rank, f"all_reduce_{round_number}", value=total.item(), world_size=dist.get_world_size())
    dist.destroy_process_group()
    if round_number == 0:
        dist.init_process_group("gloo", rank=rank, world_size=2)
