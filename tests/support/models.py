"""Small models the single-process tests share."""
from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """A linear layer times ``scale``, with a plain attribute and a method to pass through wrappers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.scale = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.scale

    def double_scale(self) -> int:
        return self.scale * 2
