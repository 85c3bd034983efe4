"""Starting XLA ranks: torch_xla's ``xmp.spawn``, one process per TPU chip of this host (on
torch_xla's CPU device: one process whose threads are the ranks, see ``strategies/xla_devices.py``).

The ranks' process is spawned (see ``_START_METHOD``); the function and its arguments travel with
cloudpickle (functions defined in a notebook work). PJRT always uses every device of the host.
A rank that raises writes its exception and traceback for the caller and ends its process at once
(its peers may be blocked inside XLA, where nothing else could reach them); the caller re-raises it.
"""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from ..checkpoint import io as checkpoint_io
from ..utilities.apply import tensors_to_cpu
from .errors import RankDiedError, describe_exception, rebuild_exception

_FAILURE = "failure.pkl"
#: a fresh interpreter for the ranks: a forked one inherits this process's autograd engine, sized for
#: the devices it saw (one XLA device), and backward on the second XLA:CPU device then fails
_START_METHOD = "spawn"


def start_xla_ranks(strategy: Any, function: Callable[..., Any], args: tuple = (), kwargs: Optional[dict] = None) -> Any:
    """Run ``function(*args, **kwargs)`` on every XLA device of ``strategy``; return rank 0's value
    (moved to the CPU). ``function`` must prepare the rank first (the launcher's ``run_on_xla_rank``
    does, through the same ``prepare`` as every launcher: ``strategy.setup_environment()``, then debug checks)."""
    from notebook_fabric.utilities import by_value
    import torch_xla.distributed.xla_multiprocessing as xmp

    if strategy.debug:
        os.environ.setdefault("PT_XLA_DEBUG_LEVEL", "2")
    environment = strategy.launch_environment()
    # one device on a TPU runs here (torch_xla's nprocs=1); on XLA:CPU the devices are made to measure
    nprocs = 1 if strategy.num_processes == 1 and "CPU_NUM_DEVICES" not in environment else None
    payload = by_value.dumps((function, tuple(args), dict(kwargs or {})))
    with tempfile.TemporaryDirectory(prefix="notebook_fabric_xla_") as folder, _environment(environment):
        result_file = os.path.join(folder, "rank0.pt")
        try:
            xmp.spawn(_run_xla_rank, args=(payload, folder), nprocs=nprocs, start_method=_START_METHOD)
        except BrokenProcessPool:
            failure = _read_failure(folder)
            if failure is not None:
                rank, described = failure
                error = rebuild_exception({rank: described}, [rank])  # its cause: the rank's traceback
                error.__suppress_context__ = True  # not the process pool's own error
                raise error
            raise RankDiedError(
                "The XLA ranks' process ended without an exception: a signal, os._exit, or XLA itself. On XLA's CPU"
                " device XLA aborts when the ranks' graphs differ at a collective: a value that differs by rank must"
                " reach the graph as tensor data (torch.tensor([rank]).to(fabric.device)), not as a Python number;"
                " run with debug=True to compare the ranks' collectives.", rank=-1, exitcode=None) from None
        return torch.load(result_file, weights_only=False) if os.path.exists(result_file) else None


def _run_xla_rank(index: int, payload: bytes, folder: str) -> None:
    """One rank under ``xmp.spawn`` (``index`` is its global ordinal): run; rank 0 writes its value for
    the caller; a failure is written for the caller and ends the process."""
    import torch_xla.runtime as xr

    from ..strategies.xla_devices import ranks_for

    ranks = ranks_for()
    ranks.enter_rank(index, int(xr.world_size()))
    try:
        function, args, kwargs = pickle.loads(payload)
        value = function(*args, **kwargs)
        if index == 0:
            checkpoint_io.atomic_save(tensors_to_cpu(value), os.path.join(folder, "rank0.pt"))
    except BaseException as error:  # noqa: BLE001 - every failure goes to the caller
        _write_failure(folder, index, error)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    ranks.leave_rank(index)


def _write_failure(folder: str, rank: int, error: BaseException) -> None:
    """The first failing rank's exception, for the caller (a later one, a consequence, is dropped)."""
    described = describe_exception(error, skip_frames_in=[os.path.dirname(__file__)])
    partial = os.path.join(folder, f"failure.{rank}.partial")
    with open(partial, "wb") as handle:
        pickle.dump((rank, described), handle)
    try:
        os.link(partial, os.path.join(folder, _FAILURE))  # atomic, and only the first one wins
    except FileExistsError:
        pass


def _read_failure(folder: str) -> Any:
    try:
        with open(os.path.join(folder, _FAILURE), "rb") as handle:
            return pickle.load(handle)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


@contextmanager
def _environment(variables: dict) -> Iterator[None]:
    """``variables`` set while torch_xla starts the ranks (they inherit them), then put back."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
