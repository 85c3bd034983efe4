"""The ranks' ``Fabric`` arguments, judged in the notebook before a cluster is asked for anything.

On one machine ``launch()`` builds the Fabric here and every bad argument fails at once. Ranks on
a cluster's hosts cannot be judged that way: a Fabric built in the notebook would resolve its
accelerator from this machine (a login node has no GPUs), and inside a Slurm job it would detect
the notebook's own job (``SLURMEnvironment``) and judge ``num_nodes`` against that. So the notebook
judges what does not depend on where it runs (the argument names, the accelerator, strategy and
precision names, which strategy fits how many ranks) with the same registries the ranks' connector
uses, and leaves the devices themselves to the ranks and the allocation's size to
:func:`~.slurm_allocation.check_capacity`.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from ..accelerators import ACCELERATOR_CHOICES, Accelerator
from ..precision import Precision, normalize_precision
from ..strategies import STRATEGY_REGISTRY, SingleDeviceStrategy, Strategy

GPU_ACCELERATORS = ("cuda", "gpu")


def check_fabric_arguments(fabric_kwargs: Mapping[str, Any], ranks: int) -> None:
    """``ValueError``/``TypeError`` for what ``Fabric(**fabric_kwargs)`` would refuse on every one of ``ranks``
    ranks, whatever host it runs on; nothing is built and no device is looked at."""
    _check_names(fabric_kwargs)
    _check_accelerator(fabric_kwargs.get("accelerator", "auto"))
    strategy = fabric_kwargs.get("strategy", "auto")
    _check_strategy(strategy, ranks)
    precision = fabric_kwargs.get("precision")
    if precision is not None and not isinstance(precision, Precision):
        normalize_precision(precision)  # raises, listing the choices
    _check_plugins(fabric_kwargs.get("plugins"))


def check_gpus(fabric_kwargs: Mapping[str, Any], devices: int, gpus_per_node: Optional[int]) -> None:
    """``ValueError`` when the ranks ask for GPUs by name and ``Slurm(gpus_per_node=)`` gives each host fewer."""
    accelerator = fabric_kwargs.get("accelerator", "auto")
    if gpus_per_node is None or not (isinstance(accelerator, str) and accelerator.lower() in GPU_ACCELERATORS):
        return
    if devices > gpus_per_node:
        raise ValueError(f"devices={devices} GPU ranks per host, but Slurm(gpus_per_node={gpus_per_node}) asks each host"
                         f" for {gpus_per_node} GPU(s): pass devices={gpus_per_node} or less, or more gpus_per_node")


def _check_names(fabric_kwargs: Mapping[str, Any]) -> None:
    from ..fabric import Fabric

    accepted = [name for name in inspect.signature(Fabric.__init__).parameters if name != "self"]
    unknown = sorted(set(fabric_kwargs) - set(accepted))
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise TypeError(f"Fabric() takes no argument{plural} {', '.join(map(repr, unknown))}"
                        f" (launch() passes every keyword it does not know itself to Fabric); Fabric takes"
                        f" {', '.join(accepted)}")


def _check_accelerator(accelerator: Any) -> None:
    if isinstance(accelerator, Accelerator):
        return
    if not isinstance(accelerator, str) or accelerator.lower() not in ACCELERATOR_CHOICES:
        raise ValueError(f"accelerator={accelerator!r} is not known. Choose one of {list(ACCELERATOR_CHOICES)}"
                         " or pass an Accelerator instance.")


def _check_strategy(strategy: Any, ranks: int) -> None:
    choices = ["auto", *STRATEGY_REGISTRY.available_strategies()]
    if isinstance(strategy, Strategy):
        single = isinstance(strategy, SingleDeviceStrategy)
    elif isinstance(strategy, str):
        name = strategy.lower()
        if name != "auto" and name not in STRATEGY_REGISTRY and name != "dp":
            raise ValueError(f"strategy={strategy!r} is not known. Choose one of {choices}, pass a Strategy instance,"
                             " or register your own with STRATEGY_REGISTRY.register(name, cls).")
        single = name != "auto" and name != "dp" and issubclass(STRATEGY_REGISTRY.get(name), SingleDeviceStrategy)
    else:
        raise ValueError(f"strategy={strategy!r} must be a registered name (one of {choices}) or a Strategy instance")
    if single and ranks > 1:
        raise ValueError(f"strategy={strategy!r} runs on one device, but the cluster would start {ranks} ranks"
                         " (devices per host x num_nodes). Use strategy='ddp' (or 'auto').")


def _check_plugins(plugins: Any) -> None:
    if plugins is None:
        return
    from ..environments import ClusterEnvironment

    for plugin in plugins if isinstance(plugins, (list, tuple)) else [plugins]:
        if isinstance(plugin, (Precision, ClusterEnvironment)):
            continue
        if hasattr(plugin, "save_checkpoint") and hasattr(plugin, "load_checkpoint"):
            continue
        raise ValueError(f"plugins got {plugin!r}, which is not a Precision, a ClusterEnvironment or a checkpoint IO"
                         " (an object with save_checkpoint/load_checkpoint).")
