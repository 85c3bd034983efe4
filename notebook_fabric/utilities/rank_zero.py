"""Printing and warning from one rank only."""
from __future__ import annotations

import os
import warnings
from typing import Any


def current_global_rank() -> int:
    """This process's global rank as the launcher announced it (0 when not distributed)."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def rank_zero_warn(message: str, category: type = UserWarning, stacklevel: int = 3) -> None:
    """``warnings.warn`` on global rank 0 only, so N ranks do not print N copies."""
    if current_global_rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel)


def rank_zero_info(*args: Any, **kwargs: Any) -> None:
    if current_global_rank() == 0:
        print(*args, **kwargs)
