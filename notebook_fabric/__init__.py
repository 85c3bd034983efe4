"""notebook-fabric: scale PyTorch training loops from a notebook.

>>> from notebook_fabric import Fabric, seed_everything, launch
"""
from .fabric import Fabric, seed_everything

__version__ = "0.1.0"


def load_ipython_extension(ipython):  # noqa: ANN001 - IPython's shell
    """``%load_ext notebook_fabric`` registers the ``%%fabric`` and ``%fabric`` magics."""
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):  # noqa: ANN001
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)


__all__ = ["Fabric", "seed_everything", "launch", "Slurm", "__version__"]

# The function users call; the package that starts and supervises ranks is `notebook_fabric.launching`.
from .launch_api import launch  # noqa: E402
from .clusters import Slurm  # noqa: E402
from .strategies import rendezvous_rounds as _rendezvous_rounds  # noqa: E402

# A rank of a launcher that hosts the store: every init_process_group, also the user's own, gets fresh keys.
_rendezvous_rounds.install()
