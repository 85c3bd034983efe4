"""Started by `notebook-fabric run`: a Lightning-style CLI script that never calls fabric.launch().

The ranks were created by the command line, so Fabric() must be ready as it is: setup(), the
sampler, a backward with synchronised gradients, and collectives all work without launch().
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core_common import emit
from notebook_fabric import Fabric

fabric = Fabric(accelerator="cpu")
model = fabric.setup(nn.Linear(2, 1, bias=False))  # no fabric.launch() anywhere
loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2))
indices = [int(value) for (batch,) in loader for value in batch]
x = torch.full((1, 2), float(fabric.global_rank + 1))
fabric.backward(model(x).sum())
fabric.launch()  # a script that calls it anyway keeps working
emit(
    fabric.global_rank, "no_launch", world_size=fabric.world_size, grad=model.weight.grad.tolist(), indices=indices,
    total=fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum").item(),
    initialized=torch.distributed.is_initialized(),
)
