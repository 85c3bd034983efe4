"""The small model and data the XLA tests train, and the eager CPU reference they compare with."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

STEPS = 6
LR = 0.1


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def initial_state() -> Dict[str, Tensor]:
    """One fixed starting point, built here (the XLA:CPU ranks are threads sharing one generator)."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model().state_dict().items()}


def full_batch() -> Tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=generator)
    return x, x[:, :4].sum(1, keepdim=True)


def shard(rank: int, world_size: int) -> Tuple[Tensor, Tensor]:
    """This rank's equal share of the full batch."""
    x, y = full_batch()
    size = x.shape[0] // world_size
    return x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]


def eager_training(initial: Dict[str, Tensor], steps: int = STEPS) -> Tuple[List[float], Dict[str, Tensor]]:
    """The full-batch SGD losses and final parameters on the CPU, eagerly."""
    model = build_model()
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = full_batch()
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fabric_training_losses(fabric: Any, model: nn.Module, optimizer: Any, steps: int = STEPS) -> List[float]:
    """``steps`` SGD steps of a set-up ``model`` on this rank's shard through ``fabric``; the losses
    averaged over the ranks (equal shards: the mean is the full-batch loss)."""
    x, y = (t.to(fabric.device) for t in shard(fabric.global_rank, fabric.world_size))
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(fabric.all_reduce(loss.detach())))
    return losses
