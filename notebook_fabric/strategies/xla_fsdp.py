"""torch_xla's FullyShardedDataParallel behind the Fabric API (``strategy="xla_fsdp"``)."""

from __future__ import annotations
import functools
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional, Union
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from ..accelerators import Accelerator
from ..checkpoint import io as checkpoint_io
from ..checkpoint import state as checkpoint_state
from ..precision import Precision
from ..utilities.apply import tensors_to_cpu
from .xla import XLAStrategy, require_xla

FSDP_STATE_DICT_TYPES = ("sharded", "full")


class XLAFSDPStrategy(XLAStrategy):
    """torch_xla's FullyShardedDataParallel: parameters, gradients and optimizer states sharded over XLA devices.

    ``auto_wrap_policy``: a torch_xla wrap policy, or a set of layer classes to wrap each on its own;
    ``activation_checkpointing_policy``: a set of layer classes to recompute in backward;
    ``state_dict_type``: ``"sharded"`` (each rank writes its shard into the checkpoint folder) or
    ``"full"`` (the shards, plus one consolidated file ``<folder>/full.pth`` written by rank 0).
    Other keyword arguments go to ``XlaFullyShardedDataParallel``. Set the model up first, then
    create its optimizer from the sharded parameters: ``model = fabric.setup_module(model)``,
    ``optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))``.
    """

    def __init__(
        self,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        auto_wrap_policy: Optional[Union[Callable, set[type[nn.Module]]]] = None,
        activation_checkpointing_policy: Optional[set[type[nn.Module]]] = None,
        state_dict_type: str = "sharded",
        sync_module_states: bool = False,
        debug: bool = False,
        **kwargs: Any,
    ) -> None:
        require_xla(type(self).__name__)
        if "precision_plugin" in kwargs:
            precision = kwargs.pop("precision_plugin")
        validate_fsdp_arguments(auto_wrap_policy, activation_checkpointing_policy, state_dict_type)
        super().__init__(sync_module_states=sync_module_states, parallel_devices=parallel_devices,
                         checkpoint_io=checkpoint_io, precision=precision, debug=debug, accelerator=accelerator)  # fmt: skip
        self.auto_wrap_policy = auto_wrap_policy
        self.activation_checkpointing_policy = activation_checkpointing_policy
        self.state_dict_type = state_dict_type
        self._fsdp_kwargs = kwargs

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        if optimizers:
            raise ValueError(
                "XLAFSDPStrategy shards (flattens) the parameters when it sets the model up, so an optimizer built"
                " before that points at the wrong tensors. Set the model up first, then build its optimizer:"
                " model = fabric.setup_module(model); optimizer = fabric.setup_optimizers(Optimizer(model.parameters()))"
            )
        return self.setup_module(module), []

    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as XLAFSDP

        kwargs = dict(self._fsdp_kwargs)
        kwargs.setdefault("pin_layout_in_collective_ops", self._ranks.pin_layout)
        policy = self.auto_wrap_policy
        if isinstance(policy, set):
            from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy

            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=policy)
        if policy is not None:
            kwargs.setdefault("auto_wrap_policy", policy)
        if self.activation_checkpointing_policy:
            from torch_xla.distributed.fsdp import checkpoint_module

            layers = tuple(self.activation_checkpointing_policy)

            def wrap(child: nn.Module, *args: Any, **inner: Any) -> nn.Module:
                return XLAFSDP(checkpoint_module(child) if isinstance(child, layers) else child, *args, **inner)

            kwargs.setdefault("auto_wrapper_callable", wrap)
        if isinstance(module, XLAFSDP):
            return module
        self._broadcast_initial_states(module)
        return XLAFSDP(module=module, **kwargs)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not all(getattr(p, "_is_sharded", False) for p in params):
            raise ValueError(
                "This optimizer holds parameters that XLAFSDPStrategy did not shard: build it from the model that"
                " fabric.setup_module() returned (after setup), e.g. torch.optim.AdamW(model.parameters())"
            )
        return optimizer

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """FSDP already reduced the gradients in backward: step, then cut the graph (as torch_xla's FSDP expects)."""
        result = self.precision.optimizer_step(optimizer, **kwargs)
        self._ranks.sync()
        return result

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        if not enabled:
            return nullcontext()
        return module.no_sync() if hasattr(module, "no_sync") else None

    def clip_gradients_norm(self, module: nn.Module, optimizer: Optimizer, max_norm: Union[float, int],
                            norm_type: Union[float, int, str] = 2.0, error_if_nonfinite: bool = True) -> Tensor:  # fmt: skip
        fsdp = getattr(module, "_forward_module", module)
        return fsdp.clip_grad_norm_(max_norm=max_norm, norm_type=float(norm_type))

    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: Union[float, int]) -> None:
        raise NotImplementedError("XLAFSDPStrategy clips by norm only (gradients are sharded): use max_norm=")

    def module_init_context(self, empty_init: Optional[bool] = None) -> ContextManager:
        if empty_init:
            raise NotImplementedError("XLAFSDPStrategy needs materialised parameters to shard: use init_module()")
        return super().module_init_context(empty_init=False)

    # ----- checkpoints: a folder with one shard file per rank ----------------------------------------
    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:  # fmt: skip
        """Every rank writes its shard (``<path>/rank-R-of-W.pth``: torch_xla's layout, so its
        ``consolidate_sharded_model_checkpoints`` reads it); with ``state_dict_type="full"`` rank 0 also
        writes the consolidated model to ``<path>/full.pth``."""
        if storage_options is not None:
            raise TypeError("XLAFSDPStrategy.save_checkpoint takes no storage_options")
        self._ranks.sync()
        key, fsdp = _sharded_module(state)
        rest = checkpoint_state.to_saveable(self, {k: v for k, v in state.items() if k != key}, filter)
        shard = {"model": fsdp.state_dict(), "shard_metadata": fsdp.get_shard_metadata(), "model_key": key,
                 "state": rest}  # fmt: skip
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint_io.atomic_save(tensors_to_cpu(shard), folder / _shard_name(self.global_rank, self.world_size))
        self.barrier("save_checkpoint")
        if self.state_dict_type == "full":
            if self.is_global_zero:
                from torch_xla.distributed.fsdp import consolidate_sharded_model_checkpoints

                consolidate_sharded_model_checkpoints(ckpt_prefix=str(folder / "rank"), ckpt_suffix="-*-of-*.pth",
                                                      save_path=str(folder / "full.pth"))  # fmt: skip
            self.barrier("save_checkpoint_full")

    def load_checkpoint(self, path: Any, state: Optional[Union[nn.Module, Optimizer, dict[str, Any]]] = None,
                        strict: bool = True) -> dict[str, Any]:  # fmt: skip
        """Each rank restores its own shard from a folder written by :meth:`save_checkpoint` (a file loads as usual)."""
        if not Path(path).is_dir():
            return super().load_checkpoint(path, state=state, strict=strict)
        if not isinstance(state, dict):
            raise ValueError("A sharded XLAFSDP checkpoint loads into state={'model': model, 'optimizer': optimizer, ...}")
        shard = checkpoint_io.load(Path(path) / _shard_name(self.global_rank, self.world_size), map_location="cpu")
        key = shard["model_key"]
        if key in state:
            getattr(state[key], "_forward_module", state[key]).load_state_dict(shard["model"], strict=strict)
        wanted = {k: v for k, v in state.items() if k != key}
        remainder = checkpoint_state.restore(self, wanted, shard["state"], strict=strict)
        state.update(wanted)
        return remainder


def _sharded_module(state: dict[str, Any]) -> tuple[str, Any]:
    found = [(key, getattr(value, "_forward_module", value)) for key, value in state.items()
             if hasattr(getattr(value, "_forward_module", value), "get_shard_metadata")]  # fmt: skip
    if len(found) != 1:
        raise ValueError(
            f"An XLAFSDP checkpoint holds one sharded model; the state has {len(found)}:"
            " pass state={'model': model, 'optimizer': optimizer, ...}"
        )
    return found[0]


def validate_fsdp_arguments(auto_wrap_policy: Any, activation_checkpointing_policy: Any, state_dict_type: str) -> None:
    """XLAFSDPStrategy's argument checks (no torch_xla needed)."""
    if state_dict_type not in FSDP_STATE_DICT_TYPES:
        raise ValueError(f"state_dict_type={state_dict_type!r}: choose one of {list(FSDP_STATE_DICT_TYPES)}")
    if auto_wrap_policy is not None and not (callable(auto_wrap_policy) or _is_layer_set(auto_wrap_policy)):
        raise TypeError("auto_wrap_policy= takes a torch_xla wrap policy (a callable) or a set of nn.Module classes")
    if activation_checkpointing_policy is not None and not _is_layer_set(activation_checkpointing_policy):
        raise TypeError("activation_checkpointing_policy= takes a set of nn.Module classes to recompute in backward")


def _is_layer_set(value: Any) -> bool:
    return isinstance(value, set) and all(isinstance(c, type) and issubclass(c, nn.Module) for c in value)


def _shard_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.pth"
