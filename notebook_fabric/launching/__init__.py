"""Process lifecycle: start, supervise and stop ranks; ``launch(fn)``; the persistent ``RankPool``.

Two processes meet here. What runs in the notebook (or the script that launches) is at this level:
the launchers and the options of a launch, running a function on a fresh pool, the pool, its supervisor and run loop,
the starters, the rendezvous. What runs inside a rank process is in :mod:`.rank`; the notebook side
never imports it, except the starters, which hand a new rank its entry point. Modules both sides
use (``protocol``, ``processes``, ``frames``, ``rank_logs``, ``errors``) sit at this level.

``notebook_fabric.launch`` (in ``launch_api.py``, above this package: it builds a Fabric) is
``Fabric(...).launch(fn)``; this package never imports ``fabric.py``. The start-method table sits
beside the strategies (``notebook_fabric.strategies.start_methods``)::

    from notebook_fabric import launch
    from notebook_fabric.launching.pool import RankPool
"""
from ..strategies.start_methods import POOL_START_METHODS, START_METHOD_TABLE, StartMethod
from .api import run_function
from .errors import (
    LaunchError, LaunchTimeoutError, PoolClosedError, RankDiedError, RankFailedError, RemoteTraceback,
    SupervisorCrashedError, format_ranks,
)
from .pool import RankPool, RankStatus
from .preflight import UnpicklableError
from .options import LaunchOptions

__all__ = [
    "run_function", "LaunchOptions", "RankPool", "RankStatus", "StartMethod", "START_METHOD_TABLE",
    "POOL_START_METHODS",
    "LaunchError", "LaunchTimeoutError", "PoolClosedError", "RankDiedError", "RankFailedError",
    "RemoteTraceback", "SupervisorCrashedError", "UnpicklableError", "format_ranks",
]
