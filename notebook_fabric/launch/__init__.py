"""Process lifecycle: start, supervise and stop ranks; ``launch(fn)``; the persistent ``RankPool``.

``notebook_fabric.launch`` (the attribute of the top-level package) is the :func:`launch`
function; import the rest from here or from the submodules::

    from notebook_fabric import launch
    from notebook_fabric.launch.pool import RankPool
"""
from .api import launch, plan_ranks, run_function
from .errors import (
    LaunchError, LaunchTimeoutError, PoolClosedError, RankDiedError, RankFailedError, RemoteTraceback, format_ranks,
)
from .pool import RankPool, RankStatus
from .preflight import UnpicklableError
from .start_methods import POOL_START_METHODS, START_METHOD_TABLE, StartMethod

__all__ = [
    "launch", "run_function", "plan_ranks", "RankPool", "RankStatus", "StartMethod", "START_METHOD_TABLE",
    "POOL_START_METHODS",
    "LaunchError", "LaunchTimeoutError", "PoolClosedError", "RankDiedError", "RankFailedError",
    "RemoteTraceback", "UnpicklableError", "format_ranks",
]
