"""The DeepSpeed config that the individual ``DeepSpeedStrategy`` arguments stand for."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

#: DeepSpeed ``zero_optimization`` options accepted as keyword arguments (DeepSpeed's defaults apply otherwise)
ZERO_OPTIONS = (
    "contiguous_gradients", "overlap_comm", "allgather_partitions", "reduce_scatter", "allgather_bucket_size",
    "reduce_bucket_size", "sub_group_size", "stage3_max_live_parameters", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_gather_16bit_weights_on_model_save", "round_robin_gradients",
)  # fmt: skip
#: fp16 loss-scaling options accepted as keyword arguments (used under ``precision="16-mixed"``)
LOSS_SCALE_OPTIONS = {"loss_scale": 0.0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      "min_loss_scale": 1}  # fmt: skip


def build_zero_config(
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    offload_params_device: str = "cpu",
    offload_optimizer_device: str = "cpu",
    nvme_path: Optional[str] = None,
    params_buffer_count: int = 5,
    params_buffer_size: int = 100_000_000,
    max_in_cpu: int = 1_000_000_000,
    optimizer_buffer_count: int = 4,
    block_size: int = 1048576,
    queue_depth: int = 8,
    single_submit: bool = False,
    overlap_events: bool = True,
    thread_count: int = 1,
    pin_memory: bool = False,
    **zero_options: Any,
) -> dict[str, Any]:
    """The DeepSpeed config for DeepSpeedStrategy's individual arguments (validated)."""
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r}: DeepSpeed ZeRO stages are 0 (off), 1, 2 and 3")
    for name, device in (("offload_params_device", offload_params_device), ("offload_optimizer_device", offload_optimizer_device)):
        if device not in ("cpu", "nvme"):
            raise ValueError(f"{name}={device!r}: DeepSpeed offloads to 'cpu' or 'nvme'")
    if offload_parameters and stage != 3:
        raise ValueError(f"offload_parameters=True needs stage=3 (parameters are partitioned only there), got stage={stage}")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer=True needs ZeRO (stage 1, 2 or 3), got stage=0")
    uses_nvme = (offload_optimizer and offload_optimizer_device == "nvme") or (
        offload_parameters and offload_params_device == "nvme"
    )
    if uses_nvme and not nvme_path:
        raise ValueError("offloading to 'nvme' needs nvme_path= (a folder on a fast local NVMe drive)")
    zero: dict[str, Any] = {"stage": stage, **zero_options}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": offload_optimizer_device, "buffer_count": optimizer_buffer_count,
                                     "pin_memory": pin_memory}  # fmt: skip
        if offload_optimizer_device == "nvme":
            zero["offload_optimizer"]["nvme_path"] = nvme_path
    if offload_parameters:
        zero["offload_param"] = {"device": offload_params_device, "buffer_count": params_buffer_count,
                                 "buffer_size": params_buffer_size, "max_in_cpu": max_in_cpu,
                                 "pin_memory": pin_memory}  # fmt: skip
        if offload_params_device == "nvme":
            zero["offload_param"]["nvme_path"] = nvme_path
    config: dict[str, Any] = {"zero_optimization": zero}
    if uses_nvme:
        config["aio"] = {"block_size": block_size, "queue_depth": queue_depth, "single_submit": single_submit,
                         "overlap_events": overlap_events, "thread_count": thread_count}  # fmt: skip
    return config


def load_config(config: Union[str, Path, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, Path)):
        if not Path(config).is_file():
            raise FileNotFoundError(f"config={str(config)!r}: no DeepSpeed config file there")
        with open(config, encoding="utf-8") as handle:
            loaded = json.load(handle)
        if not isinstance(loaded, dict):
            raise ValueError(f"config={str(config)!r} holds {type(loaded).__name__}, not a JSON object")
        return loaded
    raise TypeError(f"config= takes a dict or the path of a JSON file, got {type(config).__name__}")


def warn_ignored_arguments(**given: tuple[Any, Any]) -> None:
    ignored = [name for name, (value, default) in given.items() if value != default]
    if ignored:
        warnings.warn(
            f"DeepSpeedStrategy(config=...) was given, so {ignored} are ignored: the config wins. Put them in the config.",
            stacklevel=3,
        )
