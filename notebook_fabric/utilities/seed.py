"""Reproducible seeding of Python, NumPy and torch, on every rank and in DataLoader workers."""
from __future__ import annotations

import logging
import os
import random
import warnings
from typing import Optional

import numpy as np
import torch

SEED_ENV = "NOTEBOOK_FABRIC_GLOBAL_SEED"
WORKERS_ENV = "NOTEBOOK_FABRIC_SEED_WORKERS"
_MAX_SEED = np.iinfo(np.uint32).max
_log = logging.getLogger("notebook_fabric")


def seed_everything(seed: Optional[int] = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed ``random``, NumPy and torch (CPU and every GPU) with ``seed`` and return it.

    The seed is exported in the environment, so ranks started afterwards use the same one; with
    ``workers=True``, DataLoaders set up through Fabric seed each worker differently but
    reproducibly (see :func:`worker_init_function`). As in Lightning, ``workers`` defaults to False
    here and to True in ``Fabric.seed_everything``. ``verbose``: log "Seed set to N" (logger
    ``notebook_fabric``, level INFO) and warn when no seed was given or exported.

    >>> seed_everything(42)
    42
    """
    if seed is None:
        exported = os.environ.get(SEED_ENV)
        if exported is None and verbose:
            warnings.warn(f"No seed found, seed set to 0 (seed_everything() got no seed and {SEED_ENV} is not set)",
                          stacklevel=2)
        try:
            seed = int(exported) if exported is not None else 0
        except ValueError:
            raise ValueError(f"Invalid seed specified via {SEED_ENV}: {exported!r} (not an integer)") from None
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed} is not in bounds: numpy accepts an integer from 0 to {_MAX_SEED}")
    os.environ[SEED_ENV] = str(seed)
    os.environ[WORKERS_ENV] = "1" if workers else "0"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device lazily
    if verbose:
        _log.info("Seed set to %d", seed)
    return seed


def worker_init_function(worker_id: int, rank: Optional[int] = None) -> None:
    """Give each DataLoader worker of each rank its own deterministic seed, derived from the global seed."""
    base = os.environ.get(SEED_ENV)
    if base is None:
        return
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    sequence = np.random.SeedSequence([int(base), worker_id, rank])
    torch_seed, numpy_seed, python_seed = sequence.generate_state(3, dtype=np.uint64)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed) & 0xFFFFFFFF)
    random.seed(int(python_seed))


def workers_should_be_seeded() -> bool:
    return os.environ.get(WORKERS_ENV) == "1"
