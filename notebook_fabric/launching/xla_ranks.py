"""Starting XLA ranks: torch_xla's ``xmp.spawn``, one process per device of this host.

torch_xla pickles what it sends to its processes, so the function and its arguments travel with
cloudpickle (functions defined in a notebook work). PJRT always uses every device of the host.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Callable, Optional

import torch

from ..checkpoint import io as checkpoint_io
from ..utilities.apply import tensors_to_cpu


def start_xla_ranks(strategy: Any, function: Callable[..., Any], args: tuple = (), kwargs: Optional[dict] = None) -> Any:
    """Run ``function(*args, **kwargs)`` on every XLA device of ``strategy``, one process each; return
    rank 0's value (moved to the CPU). ``function`` must prepare the rank first (the launcher's
    ``run_on_xla_rank`` does, through the same ``prepare`` as every launcher: process group, debug checks)."""
    if strategy.num_processes == 1:
        raise ValueError(f"{type(strategy).__name__} runs one process per device; for one device use strategy='single_xla'")
    from notebook_fabric.utilities import by_value
    import torch_xla.distributed.xla_multiprocessing as xmp

    if strategy.debug:
        os.environ.setdefault("PT_XLA_DEBUG_LEVEL", "2")
    payload = by_value.dumps((function, tuple(args), dict(kwargs or {})))
    with tempfile.TemporaryDirectory(prefix="notebook_fabric_xla_") as folder:
        result_file = os.path.join(folder, "rank0.pt")
        xmp.spawn(_run_xla_rank, args=(payload, result_file), nprocs=None, start_method="fork")
        return torch.load(result_file, weights_only=False) if os.path.exists(result_file) else None


def _run_xla_rank(index: int, payload: bytes, result_file: str) -> None:
    """One rank under ``xmp.spawn`` (``index`` is its global ordinal): run, let rank 0 write its value for
    the parent, then wait until every rank is done (nobody exits while a peer may still need it)."""
    import torch_xla.core.xla_model as xm

    function, args, kwargs = pickle.loads(payload)
    value = function(*args, **kwargs)
    if index == 0:
        checkpoint_io.atomic_save(tensors_to_cpu(value), result_file)
    xm.rendezvous("notebook_fabric.end")
