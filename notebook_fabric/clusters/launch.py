"""``launch(fn, cluster=...)``: the same supervised run as on one machine, its ranks on a cluster's hosts."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Dict, Mapping, Sequence

from ..launching.options import LaunchOptions
from ..launching.preflight import check_picklable
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
    """Check everything that can be checked, get the hosts, run ``fn`` there, give the hosts back."""
    from ..fabric import build_rank_fabric
    from ..launching.api import _shipped_items, run_function
    from .slurm_hosts import SlurmHosts

    if options.start_method not in (None, "spawn"):
        raise ValueError(f"ranks on a cluster start in a fresh interpreter on each host: start_method="
                         f"{options.start_method!r} does not apply there (leave it out)")
    devices, num_nodes = cluster_shape(fabric_kwargs)
    check_picklable(_shipped_items(fabric_kwargs, fn, tuple(args), {}), "spawn")
    hosts = SlurmHosts(spec, num_nodes, devices, notify=_notify_to(options.sink))
    try:
        title = f"{options.title} on {', '.join(hosts.hosts)}"
        return run_function(fabric_kwargs, fn, args, make_fabric=build_rank_fabric, num_processes=devices * num_nodes,
                            start_method="spawn", options=dataclasses.replace(options, title=title), hosts=hosts)
    finally:
        hosts.close()


def _notify_to(sink: Any) -> Callable[[str], None]:
    def notify(text: str) -> None:
        if sink is not None:
            from ..live.events import Notice

            sink.handle(Notice(rank=-1, time=time.time(), text=text))
        else:
            print(f"[slurm] {text}", file=sys.stderr, flush=True)

    return notify
