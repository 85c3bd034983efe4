"""Turn the ``Fabric(...)`` arguments into one configured ``Strategy``.

Everything is validated here, before any process starts: a bad value raises ``ValueError`` that
lists the valid choices.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

from .accelerators import ACCELERATOR_CHOICES, Accelerator, CUDAAccelerator, XLAAccelerator, resolve_accelerator
from .cli_settings import apply_cli_settings
from .environments import ClusterEnvironment, detect_environment
from .precision import Precision, resolve_precision
from .strategies import STRATEGY_REGISTRY, ParallelStrategy, SingleDeviceStrategy, Strategy

DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "strategy": "auto",
    "devices": "auto",
    "num_nodes": 1,
    "precision": "32-true",
}


class Connector:
    """Resolves accelerator, devices, strategy, precision and cluster environment, in that order."""

    def __init__(
        self,
        accelerator: Union[str, Accelerator] = "auto",
        strategy: Union[str, Strategy] = "auto",
        devices: Union[int, str, list[int]] = "auto",
        num_nodes: int = 1,
        precision: Union[str, int, Precision, None] = None,
        plugins: Optional[Any] = None,
    ) -> None:
        given = {
            "accelerator": accelerator,
            "strategy": strategy,
            "devices": devices,
            "num_nodes": num_nodes,
            "precision": "32-true" if precision is None else precision,
        }
        given = _apply_command_line(given)
        plugin_precision, environment, checkpoint_io = _sort_plugins(plugins)
        self.accelerator = self._resolve_accelerator(given["accelerator"], given["strategy"])
        self.num_nodes = _validate_num_nodes(given["num_nodes"])
        self.environment = environment if environment is not None else detect_environment()
        devices = given["devices"]
        self._devices_given = devices != "auto"
        if devices == "auto" and self.environment.creates_processes_externally:
            # under torchrun / srun / mpirun the scheduler already decided how many ranks share this node
            local_world_size = getattr(self.environment, "local_world_size", None)
            devices = local_world_size() if callable(local_world_size) else devices
        self.device_indices = self.accelerator.parse_devices(devices)
        self.parallel_devices = self.accelerator.get_parallel_devices(self.device_indices)
        self.strategy = self._resolve_strategy(given["strategy"])
        self._validate_strategy_fits()
        self.strategy.accelerator = self.strategy.accelerator or self.accelerator
        precision_from_command_line = given["precision"] != ("32-true" if precision is None else precision)
        if plugin_precision is not None:
            self.strategy.precision = plugin_precision
        elif precision is not None or precision_from_command_line or self.strategy._precision is None:
            self.strategy.precision = resolve_precision(given["precision"], self.accelerator_device_type)
        # else: the strategy instance was built with its own precision plugin, and nothing overrides it
        if checkpoint_io is not None:
            self.strategy.checkpoint_io = checkpoint_io
        self._wire_devices()
        self.strategy.configure(self.num_nodes)
        self._validate_precision()

    @property
    def accelerator_device_type(self) -> str:
        return self.parallel_devices[0].type if self.parallel_devices else "cpu"

    # ----- accelerator ---------------------------------------------------------------------------
    @staticmethod
    def _resolve_accelerator(accelerator: Union[str, Accelerator], strategy: Any) -> Accelerator:
        if isinstance(accelerator, str) and accelerator.lower() not in ACCELERATOR_CHOICES:
            raise ValueError(
                f"accelerator={accelerator!r} is not known. Choose one of {list(ACCELERATOR_CHOICES)}"
                " or pass an Accelerator instance."
            )
        if not isinstance(accelerator, (str, Accelerator)):
            raise ValueError(
                f"accelerator={accelerator!r} must be one of {list(ACCELERATOR_CHOICES)} or an Accelerator instance"
            )
        if isinstance(strategy, str) and strategy in ("dp",) and accelerator == "auto" and CUDAAccelerator.is_available():
            return CUDAAccelerator()
        if accelerator == "auto" and _runs_on_xla(strategy):  # XLA strategies bring their device family
            return XLAAccelerator()
        return resolve_accelerator(accelerator)

    # ----- strategy ------------------------------------------------------------------------------
    def _resolve_strategy(self, strategy: Union[str, Strategy]) -> Strategy:
        if isinstance(strategy, Strategy):
            instance = strategy
        elif isinstance(strategy, str):
            name = strategy.lower()
            if name == "auto":
                name = self._auto_strategy_name()
            if name == "dp" and not isinstance(self.accelerator, CUDAAccelerator):
                # as in Lightning: DataParallel is for GPUs, the same data parallelism on CPUs is DDP
                warnings.warn(
                    f"strategy='dp' is not supported on {type(self.accelerator).__name__}, hence setting strategy='ddp'.",
                    UserWarning, stacklevel=4,
                )
                name = "ddp"
            if name not in STRATEGY_REGISTRY:
                raise ValueError(
                    f"strategy={strategy!r} is not known. Choose one of"
                    f" {['auto', *STRATEGY_REGISTRY.available_strategies()]}, pass a Strategy instance,"
                    " or register your own with STRATEGY_REGISTRY.register(name, cls)."
                )
            instance = STRATEGY_REGISTRY.create(name)
        else:
            raise ValueError(
                f"strategy={strategy!r} must be a registered name (one of"
                f" {['auto', *STRATEGY_REGISTRY.available_strategies()]}) or a Strategy instance"
            )
        return instance

    def _auto_strategy_name(self) -> str:
        if len(self.parallel_devices) == 1 and self.num_nodes == 1 and (
            self._devices_given or not self.environment.creates_processes_externally
        ):
            # devices=1 asked for in so many words is one device, also inside a launched rank (as in Lightning:
            # a rank may build a Fabric of its own, e.g. to consolidate a checkpoint)
            return "single_device"
        if self.environment.creates_processes_externally and self.environment.world_size() <= 1 and len(self.parallel_devices) == 1:
            return "single_device"
        return "ddp"

    def _validate_strategy_fits(self) -> None:
        strategy = self.strategy
        if isinstance(strategy, SingleDeviceStrategy) and (len(self.parallel_devices) > 1 or self.num_nodes > 1):
            raise ValueError(
                f"strategy='single_device' runs on one device, but devices={self.device_indices} and"
                f" num_nodes={self.num_nodes} were given. Use strategy='ddp' (or 'auto')."
            )

    def _wire_devices(self) -> None:
        strategy = self.strategy
        if isinstance(strategy, ParallelStrategy):
            if strategy.parallel_devices is None:
                strategy.parallel_devices = self.parallel_devices
            if strategy.cluster_environment is None:
                strategy.cluster_environment = self.environment
            self.environment.validate_settings(num_devices=len(self.parallel_devices), num_nodes=self.num_nodes)
        elif strategy._root_device is None:
            strategy.root_device = self.parallel_devices[0]

    def _validate_precision(self) -> None:
        precision = getattr(self.strategy.precision, "precision", "32-true")
        device_type = self.accelerator_device_type
        if precision == "16-mixed" and device_type == "mps":
            raise ValueError("precision='16-mixed' is not supported on MPS; use 'bf16-mixed' or '32-true'")


def _validate_num_nodes(num_nodes: Any) -> int:
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes!r} must be a positive integer")
    return num_nodes


def _sort_plugins(plugins: Any) -> tuple[Optional[Precision], Optional[ClusterEnvironment], Optional[Any]]:
    if plugins is None:
        return None, None, None
    if not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    precision = environment = checkpoint_io = None
    for plugin in plugins:
        if isinstance(plugin, Precision):
            precision = plugin
        elif isinstance(plugin, ClusterEnvironment):
            environment = plugin
        elif hasattr(plugin, "save_checkpoint") and hasattr(plugin, "load_checkpoint"):
            checkpoint_io = plugin
        else:
            raise ValueError(
                f"plugins got {plugin!r}, which is not a Precision, a ClusterEnvironment or a checkpoint IO"
                " (an object with save_checkpoint/load_checkpoint)."
            )
    return precision, environment, checkpoint_io


def _apply_command_line(given: dict[str, Any]) -> dict[str, Any]:
    return apply_cli_settings(given, DEFAULTS)


def _runs_on_xla(strategy: Any) -> bool:
    """Whether ``strategy`` (a registry name or an instance) is one of the XLA strategies."""
    from .strategies.xla import SingleDeviceXLAStrategy, XLAStrategy

    if isinstance(strategy, str):
        strategy = STRATEGY_REGISTRY.get(strategy) if strategy in STRATEGY_REGISTRY else None
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return issubclass(cls, (XLAStrategy, SingleDeviceXLAStrategy))
