"""Checkpoint files on disk: atomic, streamed writes and plain loads."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` streamed into a temporary file beside ``path``, then renamed over it.

    A crash or a full disk mid-write leaves the previous checkpoint intact (the rename is atomic),
    and nothing is serialised into memory first. There is no fsync: it guards against power loss,
    not process crashes, and would cost more than the write itself for small checkpoints.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(descriptor)  # torch.save writes fastest to a path (its own writer), not a Python file object
    try:
        torch.save(obj, partial)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def load(path: PathLike, map_location: Any = "cpu", weights_only: bool = False) -> Any:
    """Read a checkpoint written by :func:`atomic_save` (or any ``torch.save`` file)."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"No checkpoint at {str(target)!r}")
    return torch.load(target, map_location=map_location, weights_only=weights_only)
