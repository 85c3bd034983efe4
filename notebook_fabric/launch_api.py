"""``launch(fn)``: run ``fn(fabric, *args)`` on every rank of this machine and return rank 0's value.

It builds the Fabric here (every argument is checked before a rank starts) and launches it like
``fabric.launch(fn)`` does, through the one launcher seam (``launching/launchers.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from .clusters.launch import launch_on_cluster
from .clusters.spec import resolve_cluster
from .fabric import Fabric
from .launching.options import LaunchOptions
from .live.sinks import EventSink


def launch(fn: Callable[..., Any], *args: Any, devices: Any = 2, accelerator: Any = "auto", strategy: Any = "ddp",
           precision: Any = "32-true", start_method: Optional[str] = None, timeout: Optional[float] = None,
           return_all: bool = False, stall: Optional[float] = 30.0, sink: Optional[EventSink] = None,
           log_dir: Any = None, dashboard: Optional[bool] = None, post_mortem: bool = False,
           cluster: Any = None, **fabric_kwargs: Any) -> Any:
    """Run ``fn(fabric, *args)`` on ``devices`` ranks of this machine; return rank 0's value.

    ``fn`` (and ``args``) may be defined in a notebook cell. Each rank gets
    ``Fabric(accelerator=, strategy=, devices=, precision=, **fabric_kwargs)`` with its process
    group ready; ``fn`` runs in rank processes even for one device. ``start_method``: ``"fork"``
    (default where safe: Linux, CUDA not yet initialised here), ``"spawn"`` or ``"forkserver"``
    (which send ``fn`` and ``args`` with cloudpickle). ``timeout``: seconds the ranks may take to
    start (a :class:`LaunchTimeoutError` names those that never connected apart from those that
    never joined the process group), and then seconds the function may run before the launch ends
    with a :class:`LaunchTimeoutError` naming the ranks waiting in a collective and where the others are.
    ``return_all``: return a list of every rank's value. Tensors come back on the CPU.
    ``stall``: when some ranks have waited this many seconds in a collective the others have not
    entered, print who waits where and every rank's stack (once per stall; ``None`` turns it off).
    ``log_dir``: every rank's complete stdout and stderr also go to ``<log_dir>/rank<N>/stdout.log``
    and ``stderr.log`` (path printed at the end); by default to a temporary folder that is removed
    after a successful launch and kept (path printed) after a failure; ``False``: no log files.
    ``dashboard``: in a notebook (default there), a live table of every rank (state, collective,
    memory, progress, output) that freezes into a summary at the end; ``False`` prints text.
    ``post_mortem``: when ``fn`` raises on a rank, open pdb on the failing frame (``(Pdb rank N)``,
    asked here: the kernel's stdin or the terminal) before the ranks are stopped.
    ``breakpoint()``, ``pdb.set_trace()`` and ``input()`` in ``fn`` are asked here the same way.
    ``fabric.launch(fn, *args, ...)`` takes the same options (see :class:`~.launching.options.LaunchOptions`).

    ``cluster``: ``"slurm"`` or :class:`~notebook_fabric.Slurm` puts ``devices`` ranks on each of
    ``num_nodes`` hosts that Slurm allocates (see :mod:`notebook_fabric.clusters`).

    Outside the dashboard, rank output is printed live, tagged ``[rank N]``. An exception on any rank stops every
    rank and is re-raised here as its original type (with ``.rank``, ``.ranks`` and
    ``.remote_traceback``); a rank that dies raises :class:`RankDiedError`.
    """
    if not callable(fn):
        raise TypeError(f"launch() needs a function to run on every rank, got {type(fn).__name__}")
    options = LaunchOptions(start_method=start_method, timeout=timeout, return_all=return_all, stall=stall, sink=sink,
                            log_dir=log_dir, dashboard=dashboard, post_mortem=post_mortem,
                            title=f"launch({getattr(fn, '__qualname__', type(fn).__name__)})")
    spec = resolve_cluster(cluster)
    if spec is not None:
        kwargs = dict(accelerator=accelerator, strategy=strategy, devices=devices, precision=precision, **fabric_kwargs)
        return launch_on_cluster(spec, kwargs, fn, args, options)
    fabric = Fabric(accelerator=accelerator, strategy=strategy, devices=devices, precision=precision, **fabric_kwargs)
    num_nodes = int(getattr(fabric.strategy, "num_nodes", 1) or 1)
    if num_nodes > 1:
        raise ValueError(f"launch() starts ranks on this machine unless told where else, but num_nodes={num_nodes}:"
                         " pass cluster='slurm' (or cluster=Slurm(partition=...)) for ranks on Slurm's hosts, or use"
                         " `notebook-fabric run` on every node")
    return fabric._launch(fn, args, {}, options, fresh_processes=True)
