"""The IPython layer: the ``%%fabric`` cell magic and the ``%fabric`` line magic.

Installed as ``notebook_fabric.magics`` and loaded with ``%load_ext notebook_fabric``::

    %%fabric --devices 2 --accelerator cpu
    model = fabric.setup(torch.nn.Linear(4, 1))
    fabric.global_rank                      # shown per rank, like IPython shows a cell's value

    %fabric status | stop | restart | where | pull NAME [--rank R | --all] | push NAME ...

Only :mod:`.ipython_magics` imports IPython, and only when the extension is loaded: the modules
that run inside ranks (:mod:`.cell_task`) are importable without it.
"""
from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%fabric`` / ``%fabric`` on ``ipython`` (an InteractiveShell)."""
    from .ipython_magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Stop the pool (if any) and remove the magics."""
    from .ipython_magics import unregister

    unregister(ipython)
