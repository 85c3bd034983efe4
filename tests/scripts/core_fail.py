"""2 CPU ranks with strategy="ddp"; one rank raises while the other waits in a collective.

    python core_fail.py FAILING_RANK

The job must end at once with a non-zero exit code, the error on stderr, and no process left.
"""
import os
import sys

import torch

from core_common import emit
from notebook_fabric import Fabric

failing_rank = int(sys.argv[1])
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
fabric.barrier("ready")
emit(fabric.global_rank, "ready", pid=os.getpid())
if fabric.global_rank == failing_rank:
    raise RuntimeError(f"boom on rank {failing_rank}")
fabric.all_reduce(torch.ones(1))  # waits for the failed rank, which never comes
fabric.barrier("never")
emit(fabric.global_rank, "unreachable")
