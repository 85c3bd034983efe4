"""Device families. ``resolve_accelerator`` maps the ``accelerator=`` argument to an instance."""
from __future__ import annotations

from typing import Union

from .base import Accelerator
from .cpu import CPUAccelerator
from .cuda import CUDAAccelerator
from .mps import MPSAccelerator
from .xla import XLAAccelerator

ACCELERATORS: dict[str, type[Accelerator]] = {
    "cpu": CPUAccelerator,
    "cuda": CUDAAccelerator,
    "gpu": CUDAAccelerator,
    "mps": MPSAccelerator,
    "tpu": XLAAccelerator,
}
ACCELERATOR_CHOICES = ("auto", *ACCELERATORS)


def resolve_accelerator(accelerator: Union[str, Accelerator]) -> Accelerator:
    """``"auto"`` picks CUDA, then MPS, then TPU, then CPU; a name or an instance is used as given."""
    if isinstance(accelerator, Accelerator):
        return accelerator
    if not isinstance(accelerator, str) or accelerator.lower() not in ACCELERATOR_CHOICES:
        raise ValueError(
            f"accelerator={accelerator!r} is not known. Choose one of {list(ACCELERATOR_CHOICES)}"
            " or pass an Accelerator instance."
        )
    name = accelerator.lower()
    if name == "auto":
        for candidate in (CUDAAccelerator, MPSAccelerator):
            if candidate.is_available():
                return candidate()
        return CPUAccelerator()
    return ACCELERATORS[name]()


__all__ = [
    "Accelerator",
    "CPUAccelerator",
    "CUDAAccelerator",
    "MPSAccelerator",
    "XLAAccelerator",
    "ACCELERATORS",
    "ACCELERATOR_CHOICES",
    "resolve_accelerator",
]
