"""The interface of a device family: discovery, parsing of ``devices=``, memory queries."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Accelerator(ABC):
    """One kind of hardware. Subclass it and pass an instance as ``Fabric(accelerator=...)``."""

    name: str = "base"
    #: the ``torch.distributed`` backend that suits this device
    distributed_backend: str = "gloo"

    def setup_device(self, device: torch.device) -> None:
        """Make ``device`` current for this process (``torch.cuda.set_device`` and the like)."""

    def teardown(self) -> None:
        """Release whatever ``setup_device`` took."""

    @staticmethod
    @abstractmethod
    def parse_devices(devices: Any) -> list[int]:
        """Turn the user's ``devices=`` into a list of device indices; raise ``ValueError`` if impossible."""

    @staticmethod
    @abstractmethod
    def get_parallel_devices(indices: list[int]) -> list[torch.device]:
        """The ``torch.device`` objects for ``indices``."""

    @staticmethod
    @abstractmethod
    def auto_device_count() -> int:
        """How many devices ``devices="auto"`` means."""

    @staticmethod
    @abstractmethod
    def is_available() -> bool:
        """Whether this machine has this kind of device."""

    def memory_stats(self, device: torch.device) -> dict[str, int]:
        """Bytes in use on ``device``: keys ``allocated``, ``reserved``, ``peak``, ``total`` where known
        (and ``device``, its name). Asked by the rank's memory sampler; never initialises the device."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def parse_count_or_indices(devices: Any, available: int, kind: str, limit_note: str = "") -> list[int]:
    """Shared parsing of ``devices``: an int, ``"auto"``, ``-1``/``"-1"`` (all), a list of indices,
    or a string like ``"2"`` or ``"0,1"``. Raises ``ValueError`` naming the limit."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" or text == "-1":
            devices = -1
        elif "," in text:
            devices = [int(part) for part in text.split(",") if part.strip()]
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            raise ValueError(f"devices={devices!r} is not understood: use an int, 'auto', -1, or a list of indices")
    if isinstance(devices, bool):
        raise ValueError(f"devices={devices!r} is not understood: use an int, 'auto', -1, or a list of indices")
    if isinstance(devices, int):
        if devices == -1:
            devices = available
        if devices < 1:
            raise ValueError(f"devices={devices} must be at least 1 (or -1 / 'auto' for all {kind} devices)")
        if devices > available:
            raise ValueError(
                f"devices={devices} asks for more {kind} devices than this machine has ({available}{limit_note})."
                f" Use devices={available} or fewer."
            )
        return list(range(devices))
    if isinstance(devices, (list, tuple)):
        indices = [int(i) for i in devices]
        if not indices:
            raise ValueError("devices=[] is empty: name at least one device index")
        if len(set(indices)) != len(indices):
            raise ValueError(f"devices={list(devices)} names a device twice")
        bad = [i for i in indices if i < 0 or i >= available]
        if bad:
            raise ValueError(
                f"devices={list(devices)} names {kind} device(s) {bad} but this machine has {available}"
                f" (indices 0..{available - 1})."
            )
        return indices
    raise ValueError(f"devices={devices!r} is not understood: use an int, 'auto', -1, or a list of indices")
