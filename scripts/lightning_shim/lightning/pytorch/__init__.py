"""A stand-in for the part of ``lightning.pytorch`` that Lightning's Fabric examples use under Fabric.

Only ``LightningModule`` as Fabric sees it: an ``nn.Module`` with a ``_fabric`` attribute that
``fabric.setup()`` fills in, and ``logger`` / ``loggers`` / ``fabric`` / ``log`` / ``log_dict`` /
``print`` going through that Fabric, as Lightning's own module does when no Trainer drives it.
For scripts/lightning_suite.py only.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn


class LightningModule(nn.Module):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fabric: Optional[Any] = None

    @property
    def fabric(self) -> Optional[Any]:
        return self._fabric

    @property
    def logger(self) -> Optional[Any]:
        return self._fabric.logger if self._fabric is not None else None

    @property
    def loggers(self) -> list:
        return self._fabric.loggers if self._fabric is not None else []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if self._fabric is not None:
            self._fabric.log_dict({name: value})

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        if self._fabric is not None:
            self._fabric.log_dict(dict(dictionary))

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._fabric is None or self._fabric.is_global_zero:
            print(*args, **kwargs)
