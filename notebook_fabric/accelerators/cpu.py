"""CPU ranks: every "device" is a process on this machine's CPU, talking over gloo."""
from __future__ import annotations

import os
from typing import Any

import torch

from .base import Accelerator, parse_count_or_indices

#: how many CPU ranks one machine may run unless NOTEBOOK_FABRIC_MAX_CPU_RANKS says otherwise
DEFAULT_MAX_CPU_PROCESSES = 64


def max_cpu_processes() -> int:
    """How many CPU ranks one machine may run (read when asked); processes, not cores, so
    oversubscription is allowed."""
    return int(os.environ.get("NOTEBOOK_FABRIC_MAX_CPU_RANKS", DEFAULT_MAX_CPU_PROCESSES))


class CPUAccelerator(Accelerator):
    name = "cpu"
    distributed_backend = "gloo"

    @staticmethod
    def parse_devices(devices: Any) -> list[int]:
        if devices == "auto":
            return [0]
        if devices in (-1, "-1"):  # "all CPU devices": one rank per core
            devices = os.cpu_count() or 1
        return parse_count_or_indices(
            devices, max_cpu_processes(), "CPU", limit_note=" (the limit of CPU ranks; raise it with NOTEBOOK_FABRIC_MAX_CPU_RANKS)"
        )

    @staticmethod
    def get_parallel_devices(indices: list[int]) -> list[torch.device]:
        return [torch.device("cpu")] * len(indices)

    @staticmethod
    def auto_device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    def memory_stats(self, device: torch.device) -> dict[str, int]:
        return {}  # host memory is the rank's resident set, sampled by the rank's one memory thread
