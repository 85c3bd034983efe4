"""Apple silicon GPUs through torch.backends.mps (one device, no distributed backend)."""
from __future__ import annotations

from typing import Any

import torch

from .base import Accelerator, parse_count_or_indices


class MPSAccelerator(Accelerator):
    name = "mps"
    distributed_backend = "gloo"

    @staticmethod
    def parse_devices(devices: Any) -> list[int]:
        if not MPSAccelerator.is_available():
            raise ValueError("accelerator='mps' was requested but this machine has no Apple MPS device. Use 'cpu'.")
        if devices == "auto":
            devices = 1
        return parse_count_or_indices(devices, 1, "MPS")

    @staticmethod
    def get_parallel_devices(indices: list[int]) -> list[torch.device]:
        return [torch.device("mps", i) for i in indices]

    @staticmethod
    def auto_device_count() -> int:
        return 1 if MPSAccelerator.is_available() else 0

    @staticmethod
    def is_available() -> bool:
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())

    def memory_stats(self, device: torch.device) -> dict[str, int]:
        return {"allocated": int(torch.mps.current_allocated_memory())}
