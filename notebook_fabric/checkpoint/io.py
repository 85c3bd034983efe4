"""Checkpoint files on disk: atomic, streamed writes and plain loads."""
from __future__ import annotations

import glob
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

    The temporary file is ``.<name>.<random>.partial``; a process killed mid-save leaves it behind,
    and the next save to the same ``path`` removes it. A save still in progress (in another process)
    holds a lock on its temporary file, so only files whose writer is gone are removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        _lock(descriptor, blocking=True)  # released by the kernel however this process ends
        torch.save(obj, partial)  # torch.save writes fastest to a path (its own writer), not a Python file object
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    return target


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete the temporary files of earlier saves to ``target`` whose writer is gone; returns them."""
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        try:
            descriptor = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            if not _lock(descriptor, blocking=False):
                continue  # a save in progress
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
        finally:
            os.close(descriptor)
    return removed


def _lock(descriptor: int, blocking: bool) -> bool:
    """An exclusive ``flock`` on ``descriptor``; ``False`` if another holds it (non-blocking). Where
    ``fcntl`` does not exist every file counts as unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def load(path: PathLike, map_location: Any = "cpu", weights_only: bool = False) -> Any:
    """Read a checkpoint written by :func:`atomic_save` (or any ``torch.save`` file)."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"No checkpoint at {str(target)!r}")
    return torch.load(target, map_location=map_location, weights_only=weights_only)
