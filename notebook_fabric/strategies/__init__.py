"""Strategies and the registry that maps ``strategy=`` names to them."""
from .base import Strategy
from .ddp import DDPStrategy
from .deepspeed import DeepSpeedStrategy
from .deepspeed import register_strategies as _register_deepspeed
from .dp import DataParallelStrategy
from .fsdp import FSDPStrategy
from .fsdp import register_strategies as _register_fsdp
from .model_parallel import ModelParallelStrategy
from .model_parallel import register_strategies as _register_model_parallel
from .parallel import ParallelStrategy
from .registry import STRATEGY_REGISTRY, StrategyRegistry
from .single_device import SingleDeviceStrategy
from .xla import SingleDeviceXLAStrategy, XLAStrategy
from .xla import register_strategies as _register_xla
from .xla_fsdp import XLAFSDPStrategy


def _register_builtin_strategies(registry: StrategyRegistry) -> None:
    registry.register("single_device", SingleDeviceStrategy, "one process, one device")
    registry.register("dp", DataParallelStrategy, "torch.nn.DataParallel over the GPUs of one process")
    registry.register("ddp", DDPStrategy, "DDP; ranks re-run the script", start_method="popen")
    registry.register("ddp_spawn", DDPStrategy, "DDP; ranks spawned to run a function", start_method="spawn")
    registry.register("ddp_fork", DDPStrategy, "DDP; ranks forked to run a function", start_method="fork")
    registry.register("ddp_notebook", DDPStrategy, "DDP from a notebook (forked ranks)", start_method="fork")
    registry.register(
        "ddp_forkserver", DDPStrategy, "DDP; ranks started by a fork server", start_method="forkserver"
    )
    registry.register(
        "ddp_find_unused_parameters_true",
        DDPStrategy,
        "DDP with find_unused_parameters=True",
        start_method="popen",
        find_unused_parameters=True,
    )


_register_builtin_strategies(STRATEGY_REGISTRY)
_register_fsdp(STRATEGY_REGISTRY)
_register_model_parallel(STRATEGY_REGISTRY)
_register_deepspeed(STRATEGY_REGISTRY)
_register_xla(STRATEGY_REGISTRY)
# Lightning's legacy name of single_xla (its SingleTPUStrategy), kept so that old scripts still start
STRATEGY_REGISTRY.register("single_tpu", SingleDeviceXLAStrategy, "legacy name of 'single_xla'")

__all__ = [
    "Strategy",
    "ParallelStrategy",
    "SingleDeviceStrategy",
    "DataParallelStrategy",
    "DDPStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "DeepSpeedStrategy",
    "XLAStrategy",
    "SingleDeviceXLAStrategy",
    "XLAFSDPStrategy",
    "StrategyRegistry",
    "STRATEGY_REGISTRY",
]
