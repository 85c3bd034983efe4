"""NVIDIA GPUs through torch.cuda; nccl between ranks."""
from __future__ import annotations

import os
from typing import Any

import torch

from .base import Accelerator, parse_count_or_indices


def cuda_device_count() -> int:
    """Number of visible GPUs, without initialising CUDA in this process (safe before fork)."""
    if not torch.cuda.is_available():  # uses NVML where it can, no CUDA context
        return 0
    return torch.cuda.device_count()


class CUDAAccelerator(Accelerator):
    name = "cuda"
    distributed_backend = "nccl"

    def setup_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDAAccelerator got a non-CUDA device {device}")
        torch.cuda.set_device(device)

    def teardown(self) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    @staticmethod
    def parse_devices(devices: Any) -> list[int]:
        available = cuda_device_count()
        if available == 0:
            raise ValueError(
                "accelerator='cuda' was requested but no CUDA GPU is visible"
                f" (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})."
                " Use accelerator='cpu' or 'auto'."
            )
        if devices == "auto":
            devices = -1
        return parse_count_or_indices(devices, available, "CUDA")

    @staticmethod
    def get_parallel_devices(indices: list[int]) -> list[torch.device]:
        return [torch.device("cuda", i) for i in indices]

    @staticmethod
    def auto_device_count() -> int:
        return cuda_device_count()

    @staticmethod
    def is_available() -> bool:
        return cuda_device_count() > 0

    def memory_stats(self, device: torch.device) -> dict[str, Any]:
        if not torch.cuda.is_initialized():  # never initialise CUDA to answer
            return {}
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "device": f"cuda:{index}",
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "peak": torch.cuda.max_memory_allocated(index),
            "total": torch.cuda.get_device_properties(index).total_memory,
        }
