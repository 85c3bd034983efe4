"""The first task of a new pool: learn each rank's pid and device (shown by ``%fabric status``)."""
from __future__ import annotations

import os
from typing import Any, Dict


def probe_rank(fabric: Any, namespace: Dict[str, Any]) -> Dict[str, Any]:
    """Task run once on every rank of a new pool."""
    return {"pid": os.getpid(), "device": str(fabric.device)}
