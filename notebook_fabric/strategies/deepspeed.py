"""DeepSpeed ZeRO (stages 1-3, CPU/NVMe offload) behind the Fabric API: ``pip install 'notebook-fabric[deepspeed]'``.

The ranks and their process group are DDP's (this class subclasses :class:`DDPStrategy`);
DeepSpeed's communication layer then wraps that group. ``deepspeed`` is imported only when a rank
sets up its environment or a model, never by ``import notebook_fabric`` nor by the constructor.

>>> strategy = DeepSpeedStrategy(stage=3, offload_optimizer=True)  # doctest: +SKIP
>>> fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-mixed")  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import warnings
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..accelerators import Accelerator
from ..checkpoint.deepspeed import CHECKPOINT_TAG, CLIENT_STATE_KEY, consolidate_checkpoint
from ..checkpoint import state as checkpoint_state
from ..environments.base import ClusterEnvironment
from .start_methods import StartMethod
from ..precision import Precision
from ..precision.deepspeed import DeepSpeedPrecision, to_deepspeed_precision
from .ddp import DEFAULT_TIMEOUT, DDPStrategy
from .deepspeed_config import LOSS_SCALE_OPTIONS, ZERO_OPTIONS, build_zero_config, load_config, warn_ignored_arguments

INSTALL_HINT = "pip install 'notebook-fabric[deepspeed]'"
CLIP_MESSAGE = (
    "DeepSpeed clips gradients itself, inside engine.step(): set it in the config instead of calling"
    " fabric.clip_gradients(), e.g. DeepSpeedStrategy(config={{..., 'gradient_clipping': {value}}})."
)


def deepspeed_available() -> bool:
    """Whether ``deepspeed`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def require_deepspeed(what: str = "DeepSpeedStrategy") -> None:
    if not deepspeed_available():
        raise ImportError(f"{what} needs the `deepspeed` package, which is not installed: {INSTALL_HINT}")


def import_deepspeed(device_type: str = "cpu") -> Any:
    """``import deepspeed`` with its accelerator matching ``device_type`` (its CPU accelerator on CPU ranks)."""
    require_deepspeed()
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed first picks its accelerator
    import deepspeed
    from deepspeed.accelerator import get_accelerator, set_accelerator

    chosen = get_accelerator().device_name()
    if chosen != device_type:
        if device_type != "cpu":
            raise RuntimeError(
                f"DeepSpeed chose its {chosen!r} accelerator but this rank computes on {device_type!r}."
                f" Unset DS_ACCELERATOR (now {os.environ.get('DS_ACCELERATOR')!r}) or set it to {device_type!r}."
            )
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
    return deepspeed


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeed ZeRO: optimizer states (stage 1), gradients (2) and parameters (3) partitioned over ranks.

    Either describe the run with the arguments (``stage``, ``offload_optimizer``, ...) or pass a full
    DeepSpeed ``config`` (a dict or a JSON file); a given ``config`` wins over the arguments. Fabric
    fills in what the config leaves out: ``train_micro_batch_size_per_gpu`` (the batch size of the
    first dataloader set up, else 1), ``gradient_accumulation_steps=1``, the precision section
    (``bf16``/``fp16``) from ``precision=``, and permission to run your own torch optimizer
    (``zero_allow_untested_optimizer``, ``zero_force_ds_cpu_optimizer=False``).

    Extra keyword arguments: DeepSpeed ``zero_optimization`` options (``overlap_comm``,
    ``reduce_bucket_size``, ... see ``ZERO_OPTIONS``), fp16 loss scaling (``loss_scale``,
    ``initial_scale_power``, ...), ``pin_memory`` for offloading, ``start_method``.
    """

    def __init__(
        self,
        stage: int = 2,
        remote_device: Optional[str] = None,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        offload_params_device: str = "cpu",
        nvme_path: Optional[str] = None,
        params_buffer_count: int = 5,
        params_buffer_size: int = 100_000_000,
        max_in_cpu: int = 1_000_000_000,
        offload_optimizer_device: str = "cpu",
        optimizer_buffer_count: int = 4,
        block_size: int = 1048576,
        queue_depth: int = 8,
        single_submit: bool = False,
        overlap_events: bool = True,
        thread_count: int = 1,
        config: Optional[Union[str, Path, dict[str, Any]]] = None,
        logging_level: int = logging.WARN,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = DEFAULT_TIMEOUT,
        accelerator: Optional[Accelerator] = None,
        start_method: StartMethod = "popen",
        pin_memory: bool = False,
        **kwargs: Any,
    ) -> None:
        require_deepspeed()
        if "precision_plugin" in kwargs:  # the spec's name for it
            if precision is not None:
                raise TypeError("pass precision= or precision_plugin=, not both")
            precision = kwargs.pop("precision_plugin")
        loss_scaling = {key: kwargs.pop(key) for key in list(kwargs) if key in LOSS_SCALE_OPTIONS}
        zero_options = {key: kwargs.pop(key) for key in list(kwargs) if key in ZERO_OPTIONS}
        if kwargs:
            raise TypeError(
                f"DeepSpeedStrategy got unknown arguments {sorted(kwargs)}. Other DeepSpeed settings go in config=;"
                f" accepted keywords: {sorted([*ZERO_OPTIONS, *LOSS_SCALE_OPTIONS])}"
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=None,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if precision is not None:
            self.precision = precision
        self.remote_device = remote_device
        self.logging_level = logging_level
        self._loss_scaling = {**LOSS_SCALE_OPTIONS, **loss_scaling}
        self._batch_size: Optional[int] = None
        self._engines: list[Any] = []
        if config is not None:
            self.config = load_config(config)
            warn_ignored_arguments(
                stage=(stage, 2), offload_optimizer=(offload_optimizer, False),
                offload_parameters=(offload_parameters, False), nvme_path=(nvme_path, None), **{
                    name: (value, None) for name, value in zero_options.items()
                },
            )  # fmt: skip
        else:
            self.config = build_zero_config(
                stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                offload_params_device=offload_params_device, offload_optimizer_device=offload_optimizer_device,
                nvme_path=nvme_path, params_buffer_count=params_buffer_count, params_buffer_size=params_buffer_size,
                max_in_cpu=max_in_cpu, optimizer_buffer_count=optimizer_buffer_count, block_size=block_size,
                queue_depth=queue_depth, single_submit=single_submit, overlap_events=overlap_events,
                thread_count=thread_count, pin_memory=pin_memory, **zero_options,
            )  # fmt: skip

    # ----- configuration -------------------------------------------------------------------------
    def adapt_precision(self, precision: Precision) -> DeepSpeedPrecision:
        # the connector hands every strategy the generic plugin for precision=; DeepSpeed runs its own
        return to_deepspeed_precision(precision)

    @property
    def zero_stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    @property
    def shards_parameters(self) -> bool:  # type: ignore[override]
        return self.zero_stage == 3

    def process_dataloader(self, dataloader: Any) -> Any:
        """Note the batch size of the first dataloader for ``train_micro_batch_size_per_gpu``; returns it unchanged."""
        batch_size = getattr(dataloader, "batch_size", None)
        if self._batch_size is None and isinstance(batch_size, int) and batch_size > 0:
            self._batch_size = batch_size
        return dataloader

    def configure_deepspeed_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` completed with what Fabric knows (batch size, accumulation, precision, optimizer
        permissions); entries already in ``config`` are kept. Returns a new dict."""
        config = copy.deepcopy(config)
        if "train_batch_size" in config:  # DeepSpeed derives the missing one of the three from the other two
            if "train_micro_batch_size_per_gpu" not in config and "gradient_accumulation_steps" not in config:
                config["gradient_accumulation_steps"] = 1
        else:
            config.setdefault("train_micro_batch_size_per_gpu", self._batch_size or 1)
            config.setdefault("gradient_accumulation_steps", 1)
        if "fp16" not in config and "bf16" not in config:
            config.update(self.precision.config_section(**self._loss_scaling))
        config.setdefault("zero_allow_untested_optimizer", True)  # Fabric runs the optimizer you built
        config.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also when its states are offloaded
        return config

    # ----- lifecycle -----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        super().setup_environment()  # device + our process group (gloo on CPU)
        deepspeed = self._deepspeed()
        # DeepSpeed's communication layer wraps the group that exists now (it creates none)
        deepspeed.comm.init_distributed(
            dist_backend=self.process_group_backend, timeout=self.timeout, verbose=False, dist_init_required=False
        )

    def _deepspeed(self) -> Any:
        deepspeed = import_deepspeed(self.root_device.type)
        from deepspeed.utils import logger

        logger.setLevel(self.logging_level)
        # DeepSpeed calls these torch.distributed functions on every step; the deprecation is not the user's to fix
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        if "fp16" in self.configure_deepspeed_config(self.config) and self.root_device.type == "cpu":
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise ValueError(
                    "DeepSpeed cannot run float16 on this CPU; use precision='bf16-mixed' (or 'bf16-true') on CPU ranks"
                )
        return deepspeed

    def teardown(self) -> None:
        self._engines.clear()
        super().teardown()

    # ----- models and optimizers -----------------------------------------------------------------
    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        """One DeepSpeed engine for ``module`` and its one optimizer: ``(engine, [engine's optimizer])``."""
        if not optimizers:
            return self.setup_module(module), []
        if len(optimizers) != 1:
            raise ValueError(
                f"DeepSpeed drives exactly one optimizer per model, got {len(optimizers)}. Put the parameter groups"
                " into one optimizer, e.g. torch.optim.AdamW([{'params': a.parameters()}, {'params': b.parameters(),"
                " 'lr': 1e-4}])."
            )
        engine = self._initialize_engine(module, optimizers[0])
        return engine, [engine.optimizer]

    def setup_module(self, module: nn.Module) -> nn.Module:
        """An engine without optimizer, for inference. Stages 1 and 2 partition only optimizer states and
        gradients, so without an optimizer the engine runs unpartitioned (stage 0); stage 3 keeps its
        parameters partitioned."""
        return self._initialize_engine(module, None)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        raise NotImplementedError(
            "DeepSpeed builds the model and its optimizer into one engine: call fabric.setup(model, optimizer)"
            " instead of fabric.setup_module() + fabric.setup_optimizers()."
        )

    def _initialize_engine(self, module: nn.Module, optimizer: Optional[Optimizer]) -> Any:
        deepspeed = self._deepspeed()
        config = self.configure_deepspeed_config(self.config)
        if optimizer is None and self.zero_stage in (1, 2):  # DeepSpeed refuses these stages without an optimizer
            zero = config["zero_optimization"]
            config["zero_optimization"] = {**{k: v for k, v in zero.items() if k != "offload_optimizer"}, "stage": 0}
        optimizer = checkpoint_state.unwrap_optimizer(optimizer) if optimizer is not None else None
        parameters = [p for p in module.parameters() if p.requires_grad] if optimizer is not None else None
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=parameters, config=config, dist_init_required=False
        )
        self._engines.append(engine)
        return engine

    def module_init_context(self, empty_init: Optional[bool] = None) -> ContextManager:
        """Under ZeRO stage 3 parameters are created already partitioned (``deepspeed.zero.Init``)."""
        if not self.shards_parameters:
            return super().module_init_context(empty_init=empty_init)
        if empty_init is False:
            raise NotImplementedError(
                "init_module(empty_init=False) is not possible with ZeRO stage 3: deepspeed.zero.Init creates"
                " every parameter partitioned over the ranks. Use init_module() (or empty_init=True)."
            )
        deepspeed = self._deepspeed()
        stack = ExitStack()
        stack.enter_context(self.precision.module_init_context())
        stack.enter_context(
            deepspeed.zero.Init(
                remote_device=self.remote_device, config_dict_or_path=self.configure_deepspeed_config(self.config)
            )
        )
        return stack

    # ----- the training step ---------------------------------------------------------------------
    def backward(self, tensor: Tensor, module: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        """``engine.backward(tensor)``: DeepSpeed scales the loss and reduces or partitions the gradients."""
        self.precision.backward(tensor, self._engine_of(module), *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """``engine.step()``: the optimizer step, loss-scale update, gradient clipping and zeroing."""
        if kwargs.get("closure") is not None:
            raise TypeError("DeepSpeed's engine.step() takes no closure (LBFGS-style optimizers cannot run under it)")
        optimizer = checkpoint_state.unwrap_optimizer(optimizer)
        for engine in self._engines:
            if engine.optimizer is optimizer:
                return engine.step()
        raise RuntimeError("This optimizer was not set up with this DeepSpeed strategy: use fabric.setup(model, optimizer)")

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        """None: DeepSpeed cannot skip its gradient reduction (use ``gradient_accumulation_steps`` in the config)."""
        return None

    def clip_gradients_norm(self, module: nn.Module, optimizer: Optimizer, max_norm: Union[float, int],
                            norm_type: Union[float, int, str] = 2.0, error_if_nonfinite: bool = True) -> Tensor:  # fmt: skip
        raise NotImplementedError(CLIP_MESSAGE.format(value=max_norm))

    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: Union[float, int]) -> None:
        raise NotImplementedError(
            "DeepSpeed clips by norm only, inside engine.step(): set 'gradient_clipping' (a max norm) in the config,"
            " e.g. DeepSpeedStrategy(config={..., 'gradient_clipping': 1.0})."
        )

    def _engine_of(self, module: Optional[nn.Module]) -> Any:
        if module is None:
            if len(self._engines) == 1:
                return self._engines[0]
            raise RuntimeError(
                "DeepSpeed runs the backward through the model's engine: pass fabric.backward(loss, model=model)"
                f" ({len(self._engines)} models are set up)"
            )
        module = getattr(module, "_forward_module", module)
        for engine in self._engines:
            if module is engine or module is engine.module:
                return engine
        raise RuntimeError(f"{type(module).__name__} was not set up with this DeepSpeed strategy (fabric.setup())")

    def _engine_in_state(self, state: dict[str, Any]) -> Any:
        engines = []
        for value in state.values():
            inner = getattr(value, "_forward_module", value)
            if any(inner is engine for engine in self._engines):
                engines.append(inner)
        if len(engines) != 1:
            found = "no model set up" if not engines else f"{len(engines)} models"
            raise ValueError(
                f"A DeepSpeed checkpoint holds one engine: the state must contain exactly one model set up with this"
                f" strategy (found {found}), e.g. state={{'model': model, 'optimizer': optimizer, 'step': step}}."
            )
        return engines[0]

    # ----- checkpoints ---------------------------------------------------------------------------
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        module = self._plain_module(module)
        if not self.shards_parameters:
            return module.state_dict()
        with self._deepspeed().zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: value.detach().clone() for name, value in module.state_dict().items()}

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        module = self._plain_module(module)
        if not self.shards_parameters:
            module.load_state_dict(state_dict, strict=strict)
            return
        # every rank loads; rank 0's values are the ones kept when the parameters are partitioned again
        with self._deepspeed().zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            module.load_state_dict(state_dict, strict=strict)

    def _plain_module(self, module: nn.Module) -> nn.Module:
        module = getattr(module, "_forward_module", module)
        for engine in self._engines:
            if module is engine:
                return engine.module
        return checkpoint_state.unwrap_module(module)

    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Optional[Any] = None,
        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None,
    ) -> None:
        """Every rank writes its shard into the folder ``path`` (``engine.save_checkpoint``); the other
        entries of ``state`` travel as DeepSpeed client state."""
        if storage_options is not None:
            raise TypeError("DeepSpeedStrategy.save_checkpoint takes no storage_options")
        if filter is not None:
            raise TypeError("DeepSpeed writes the engine's full state: filter= is not supported with DeepSpeedStrategy")
        engine = self._engine_in_state(state)
        rest = {key: value for key, value in state.items() if not _is_engine_part(value, engine)}
        client_state = {CLIENT_STATE_KEY: checkpoint_state.to_saveable(self, rest)}
        engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, client_state=client_state)
        self.barrier("save_checkpoint")

    def load_checkpoint(
        self, path: Any, state: Optional[Union[nn.Module, Optimizer, dict[str, Any]]] = None, strict: bool = True
    ) -> dict[str, Any]:
        """Restore the engine (and its optimizer, if ``state`` names it) from the folder ``path`` and the other
        entries of ``state`` in place; return the saved entries ``state`` does not name.

        A file (``consolidate_checkpoint``'s output, or any Fabric checkpoint) loads as with other strategies.
        The engine is restored first: with ``strict=True`` an entry of ``state`` missing from the checkpoint
        raises ``KeyError`` after that. A folder not written by Fabric returns DeepSpeed's whole client state.
        """
        if Path(path).is_file():
            return super().load_checkpoint(path, state=state, strict=strict)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"No DeepSpeed checkpoint folder at {str(path)!r}")
        if isinstance(state, nn.Module):
            state = {"model": state}
        if not isinstance(state, dict):
            raise ValueError(
                "A DeepSpeed checkpoint loads into the live engine: pass state={'model': model, 'optimizer':"
                " optimizer, ...} (or a consolidated file to fabric.load(path) for the raw contents)"
            )
        engine = self._engine_in_state(state)
        wants_optimizer = any(
            engine.optimizer is not None and checkpoint_state.unwrap_optimizer(value) is engine.optimizer
            for value in state.values()
        )
        load_path, client_state = engine.load_checkpoint(
            str(path), tag=None, load_module_strict=strict, load_optimizer_states=wants_optimizer,
            load_lr_scheduler_states=False,
        )  # fmt: skip
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {str(path)!r} (no 'latest' file)")
        saved = client_state.get(CLIENT_STATE_KEY, client_state)
        wanted = {key: value for key, value in state.items() if not _is_engine_part(value, engine)}
        remainder = checkpoint_state.restore(self, wanted, saved, strict=strict)
        for key in wanted:
            if key in saved:
                state[key] = wanted[key]
        return remainder

    @staticmethod
    def consolidate_checkpoint(checkpoint_dir: Any, output_file: Any, tag: Optional[str] = None) -> Path:
        """See :func:`consolidate_checkpoint`."""
        return consolidate_checkpoint(checkpoint_dir, output_file, tag=tag)

    def __repr__(self) -> str:
        return f"DeepSpeedStrategy(stage={self.zero_stage}, start_method={self.start_method})"


def _is_engine_part(value: Any, engine: Any) -> bool:
    inner = getattr(value, "_forward_module", value)
    if inner is engine:
        return True
    return engine.optimizer is not None and checkpoint_state.unwrap_optimizer(value) is engine.optimizer


def register_strategies(registry: Any) -> None:
    """Register the DeepSpeed names (the class is importable without deepspeed; building it needs it)."""
    entries = {
        "deepspeed": ("DeepSpeed ZeRO stage 2", {}),
        "deepspeed_stage_1": ("DeepSpeed ZeRO stage 1: optimizer states partitioned", {"stage": 1}),
        "deepspeed_stage_1_offload": (
            "DeepSpeed ZeRO stage 1, optimizer states offloaded to the CPU", {"stage": 1, "offload_optimizer": True}
        ),
        "deepspeed_stage_2": ("DeepSpeed ZeRO stage 2: optimizer states and gradients partitioned", {"stage": 2}),
        "deepspeed_stage_2_offload": (
            "DeepSpeed ZeRO stage 2, optimizer states offloaded to CPU", {"stage": 2, "offload_optimizer": True}
        ),
        "deepspeed_stage_3": ("DeepSpeed ZeRO stage 3: parameters partitioned too", {"stage": 3}),
        "deepspeed_stage_3_offload": (
            "DeepSpeed ZeRO stage 3, optimizer states and parameters offloaded to CPU",
            {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
        ),
        "deepspeed_stage_3_offload_nvme": (
            "DeepSpeed ZeRO stage 3 offloaded to NVMe at /local_nvme",
            {"stage": 3, "offload_optimizer": True, "offload_parameters": True, "nvme_path": "/local_nvme",
             "offload_params_device": "nvme", "offload_optimizer_device": "nvme"},
        ),
    }  # fmt: skip
    for name, (description, params) in entries.items():
        registry.register(name, DeepSpeedStrategy, description, **params)


__all__ = [
    "DeepSpeedStrategy",
    "DeepSpeedPrecision",
    "build_zero_config",
    "consolidate_checkpoint",
    "deepspeed_available",
    "register_strategies",
]
