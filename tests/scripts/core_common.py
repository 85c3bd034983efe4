"""Helpers shared by the tests/scripts/core_*.py scripts (imported from the script's own folder).

Each result is one line ``NFTEST {"rank": r, "check": name, ...}`` that tests/conftest.py parses.
"""
from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import TensorDataset

TAG = "NFTEST "


def emit(rank: int, check: str, **values: Any) -> None:
    """Print one JSON result line in a single write (lines of two ranks never interleave)."""
    sys.stdout.write(TAG + json.dumps({"rank": rank, "check": check, **values}) + "\n")
    sys.stdout.flush()


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """A hash of the exact bytes of ``tensors``: equal digests mean bit-identical values."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_model() -> nn.Module:
    """The small model that the checkpoint tests save and load on 1 and 2 ranks (tests build the same)."""
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def state_digest(module: nn.Module) -> str:
    """:func:`digest` of a module's state dict (its tensors in state-dict order)."""
    return digest(module.state_dict().values())


def classification_dataset(n: int = 512, features: int = 16, classes: int = 4) -> TensorDataset:
    """Gaussian blobs, one per class: a small MLP's loss falls within a few epochs."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=generator)
    targets = torch.randint(0, classes, (n,), generator=generator)
    inputs = centers[targets] + torch.randn(n, features, generator=generator)
    return TensorDataset(inputs, targets)


class MyModel(nn.Module):
    """Stands in for spec/002's ``MyModel``."""

    def __init__(self, features: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
