"""One process, one device."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..accelerators import Accelerator
from ..precision import Precision
from .base import Strategy


class SingleDeviceStrategy(Strategy):
    """Train on one CPU or GPU without any communication.

    >>> SingleDeviceStrategy(device="cpu").root_device
    device(type='cpu')
    """

    def __init__(
        self,
        device: Optional[Union[str, torch.device]] = None,
        accelerator: Optional[Accelerator] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision=precision)
        if device is not None:
            self.root_device = torch.device(device)
