"""TPUs (and XLA on other devices) through torch_xla, an optional extra: ``pip install notebook-fabric[xla]``."""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from .base import Accelerator, parse_count_or_indices


def xla_available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None

#: virtual devices torch_xla's CPU device may be asked for (each rank is a thread)
XLA_CPU_MAX_DEVICES = 64


class XLAAccelerator(Accelerator):
    name = "tpu"
    distributed_backend = "xla"

    @staticmethod
    def parse_devices(devices: Any) -> list[int]:
        if not xla_available():
            raise ValueError(
                "accelerator='tpu' needs torch_xla, which is not installed:"
                " pip install 'notebook-fabric[xla]' (torch-xla pins its own torch version)."
            )
        if _on_xla_cpu():
            # torch_xla's CPU device has as many virtual devices as asked for (CPU_NUM_DEVICES, set by the
            # launcher): "auto" is what the environment says, else one
            if devices in ("auto", -1, "-1"):
                devices = int(os.environ.get("CPU_NUM_DEVICES") or 1)
            return parse_count_or_indices(devices, XLA_CPU_MAX_DEVICES, "XLA:CPU")
        available = XLAAccelerator.auto_device_count()
        if devices == "auto":
            devices = -1
        return parse_count_or_indices(devices, max(available, 1), "XLA")

    @staticmethod
    def get_parallel_devices(indices: list[int]) -> list[torch.device]:
        # named, not asked of torch_xla: asking would start its runtime here, where xmp.spawn then refuses
        return [torch.device("xla", i) for i in indices]

    @staticmethod
    def auto_device_count() -> int:
        if not xla_available():
            return 0
        # counting through torch_xla.runtime would start the runtime here, and xmp.spawn then refuses
        from torch_xla._internal import tpu

        return int(tpu.num_available_devices())

    @staticmethod
    def is_available() -> bool:
        if not xla_available():
            return False
        try:
            return XLAAccelerator.auto_device_count() > 0
        except Exception:  # noqa: BLE001 - a broken runtime means "not available"
            return False


def _on_xla_cpu() -> bool:
    """Whether torch_xla runs on its CPU device here (PJRT_DEVICE=CPU, or no TPU for it to find)."""
    chosen = os.environ.get("PJRT_DEVICE")
    if chosen:
        return chosen.upper() == "CPU"
    try:
        return XLAAccelerator.auto_device_count() == 0
    except Exception:  # noqa: BLE001 - no TPU runtime to ask: torch_xla falls back to its CPU device
        return True

