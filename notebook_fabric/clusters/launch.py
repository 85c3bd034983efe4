"""``launch(fn, cluster=...)``: the same supervised run as on one machine, its ranks on a cluster's hosts."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Dict, Mapping, Sequence

from ..launching.options import LaunchOptions
from ..launching.preflight import UnpicklableError
from .fabric_check import check_fabric_arguments, check_gpus
from .spec import Slurm


def cluster_shape(fabric_kwargs: Mapping[str, Any]) -> "tuple[int, int]":
    """``(devices per host, num_nodes)`` from the Fabric arguments (``ValueError`` if they are not counts)."""
    devices, num_nodes = fabric_kwargs.get("devices", 1), fabric_kwargs.get("num_nodes", 1)
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"on a cluster, {name}= must be a positive number (ranks per host, hosts), got {value!r}")
    return devices, num_nodes


def launch_on_cluster(spec: Slurm, fabric_kwargs: Dict[str, Any], fn: Callable[..., Any], args: Sequence[Any],
                      options: LaunchOptions) -> Any:
    """Check everything that can be checked here (the Fabric arguments, :mod:`.fabric_check`; what must
    travel pickles), get the hosts (which checks the request against Slurm's nodes first), run ``fn``
    there, give the hosts back. Nothing is asked of Slurm before the checks pass."""
    from ..fabric import build_rank_fabric
    from ..launching.api import _shipped_items, run_function
    from .slurm_hosts import SlurmHosts

    if options.start_method not in (None, "spawn"):
        raise ValueError(f"ranks on a cluster start in a fresh interpreter on each host: start_method="
                         f"{options.start_method!r} does not apply there (leave it out)")
    devices, num_nodes = cluster_shape(fabric_kwargs)
    check_fabric_arguments(fabric_kwargs, devices * num_nodes)
    check_gpus(fabric_kwargs, devices, spec.gpus_per_node)
    check_travels(_shipped_items(fabric_kwargs, fn, tuple(args), {}))
    hosts = SlurmHosts(spec, num_nodes, devices, notify=_notify_to(options.sink))
    try:
        title = f"{options.title} on {', '.join(hosts.hosts)}"
        return run_function(fabric_kwargs, fn, args, make_fabric=build_rank_fabric, num_processes=devices * num_nodes,
                            start_method="spawn", options=dataclasses.replace(options, title=title), hosts=hosts)
    finally:
        hosts.close()


def check_travels(items: Mapping[str, Any]) -> None:
    """:class:`UnpicklableError` naming the first of ``items`` (described by their keys) that cloudpickle
    cannot send: ranks on a cluster's hosts start in a fresh interpreter, so everything travels."""
    from ..utilities import by_value

    for description, value in items.items():
        try:
            by_value.dumps(value)
        except Exception as error:  # noqa: BLE001 - whatever pickling raises is the reason
            raise UnpicklableError(
                f"{description} (a {type(value).__module__}.{type(value).__qualname__}) cannot be sent to the ranks on"
                f" the cluster's hosts: they start in a fresh interpreter there, so it travels with cloudpickle, which"
                f" fails with {type(error).__name__}: {error}. Create it inside the function instead, or pass"
                " something picklable (a path, a config) and build it from that on the ranks."
            ) from error


def _notify_to(sink: Any) -> Callable[[str], None]:
    def notify(text: str) -> None:
        if sink is not None:
            from ..live.events import Notice

            sink.handle(Notice(rank=-1, time=time.time(), text=text))
        else:
            print(f"[slurm] {text}", file=sys.stderr, flush=True)

    return notify
