"""Fully Sharded Data Parallel on FSDP2 (``torch.distributed.fsdp.fully_shard``): every rank keeps
a shard of each parameter, gradient and optimizer state; layers gather their parameters to run.

>>> strategy = FSDPStrategy(auto_wrap_policy={nn.TransformerDecoderLayer},
...                         activation_checkpointing_policy={nn.TransformerDecoderLayer})
>>> fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-mixed")  # doctest: +SKIP
>>> model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters()))  # doctest: +SKIP

The FSDP1-style arguments map onto FSDP2: ``sharding_strategy`` FULL_SHARD / SHARD_GRAD_OP ->
``reshard_after_forward`` True / False, HYBRID_SHARD -> a (nodes x devices) mesh; ``cpu_offload``
-> ``CPUOffloadPolicy``; ``mixed_precision`` (or the Fabric precision) -> ``MixedPrecisionPolicy``.
FSDP2 always keeps the original parameters and limits all-gathers itself, so ``use_orig_params``
and ``limit_all_gathers`` change nothing. Extra keyword arguments go to ``fully_shard``.
"""
from __future__ import annotations

import inspect
from datetime import timedelta
from functools import partial
from typing import Any, Callable, ContextManager, Optional, Union

import torch
from torch import nn

from ..accelerators import Accelerator
from ..environments.base import ClusterEnvironment
from .start_methods import StartMethod
from ..precision import Precision
from .dtensor import DTensorStrategy, post_order

#: sharding_strategy name -> (a 2-D replicate x shard mesh, reshard_after_forward)
_SHARDING = {"FULL_SHARD": (False, True), "SHARD_GRAD_OP": (False, False), "HYBRID_SHARD": (True, True),
             "_HYBRID_SHARD_ZERO2": (True, False)}  # fmt: skip
_STATE_DICT_TYPES = {"full": "full", "full_state_dict": "full", "sharded": "sharded", "sharded_state_dict": "sharded"}
_MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_WRAPPED = "_checkpoint_wrapped_module"  # the attribute torch's CheckpointWrapper keeps the layer in
Policy = Union[set, frozenset, list, tuple, Callable[..., bool], Any]


class FSDPStrategy(DTensorStrategy):
    """Shard parameters, gradients and optimizer states over the ranks with FSDP2.

    ``auto_wrap_policy``: which submodules become their own FSDP unit (a set of module classes, a
    ``module -> bool`` function, or a torch FSDP1 policy such as
    ``partial(transformer_auto_wrap_policy, transformer_layer_cls={Block})``). The root is always one.
    ``activation_checkpointing_policy``: the same forms, for the layers whose activations are
    recomputed in backward (``activation_checkpointing=True`` alone checkpoints the wrapped units).
    ``state_dict_type``: ``"full"`` (default: one file from rank 0 that any strategy loads) or
    ``"sharded"`` (a directory written by every rank with torch.distributed.checkpoint).

    Sharding gives the model new (DTensor) parameters, so ``fabric.setup(model, optimizer)`` returns
    a new optimizer of the same class and settings over them: use the returned one, and create LR
    schedulers after setup. ``fabric.init_module()`` builds on the meta device; setup initialises
    each layer with its ``reset_parameters()`` after sharding.
    """

    def __init__(
        self,
        cpu_offload: Optional[Any] = None,
        mixed_precision: Optional[Any] = None,
        auto_wrap_policy: Optional[Policy] = None,
        activation_checkpointing: Optional[Any] = None,
        activation_checkpointing_policy: Optional[Policy] = None,
        sharding_strategy: Optional[Any] = None,
        state_dict_type: Optional[Any] = None,
        use_orig_params: bool = False,
        limit_all_gathers: bool = True,
        sync_module_states: bool = False,
        forward_prefetch: bool = False,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[Any] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = None,
        start_method: StartMethod = "popen",
        accelerator: Optional[Accelerator] = None,
        precision_plugin: Optional[Precision] = None,
        device_mesh: Optional[Any] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision=precision if precision is not None else precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
        )  # fmt: skip
        self.cpu_offload = _offload_flag(cpu_offload)
        self.mixed_precision = mixed_precision
        _check_policy(auto_wrap_policy, "auto_wrap_policy")
        self.auto_wrap_policy = auto_wrap_policy
        self._checkpoint_units, self.activation_checkpointing_policy = _checkpointing(
            activation_checkpointing, activation_checkpointing_policy, auto_wrap_policy
        )
        self.sharding_strategy = _sharding_name(sharding_strategy)
        self._hybrid, self.reshard_after_forward = _SHARDING[self.sharding_strategy]
        self.state_dict_type = _state_dict_type(state_dict_type)
        self.use_orig_params = use_orig_params  # ignored: FSDP2 always trains the original parameters
        self.limit_all_gathers = limit_all_gathers  # FSDP2 bounds in-flight all-gathers by itself
        self.sync_module_states = sync_module_states
        self.forward_prefetch = forward_prefetch
        self._fully_shard_kwargs = _check_fully_shard_kwargs(kwargs)
        self._mesh: Any = None
        self._mesh_shape: Optional[tuple[int, int]] = None
        if device_mesh is not None:  # Lightning's hybrid-sharding mesh: (replicas, shards) or a DeviceMesh
            if self.sharding_strategy not in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
                raise ValueError("device_mesh= is for sharding_strategy='HYBRID_SHARD' (a replicate x shard mesh)")
            if isinstance(device_mesh, tuple) and len(device_mesh) == 2 and all(isinstance(n, int) and n > 0 for n in device_mesh):
                self._mesh_shape = device_mesh
            elif type(device_mesh).__name__ == "DeviceMesh" and device_mesh.ndim == 2:
                self._mesh = device_mesh
            else:
                raise ValueError(f"device_mesh={device_mesh!r}: pass (replicas, shards_per_replica) or a 2-D DeviceMesh")

    # ----- settings ------------------------------------------------------------------------------
    @property
    def device_mesh(self) -> Any:
        """The mesh of the shards: ``("shard",)``, or ``("replicate", "shard")`` under HYBRID_SHARD."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._require_process_group("the device mesh")
            if self._mesh_shape is not None:
                shape, names = self._mesh_shape, ("replicate", "shard")
            elif self._hybrid:
                shape, names = (self.num_nodes, self.world_size // self.num_nodes), ("replicate", "shard")
            else:
                shape, names = (self.world_size,), ("shard",)
            self._mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        return self._mesh

    @property
    def _save_sharded(self) -> bool:
        return self.state_dict_type == "sharded"

    def mixed_precision_policy(self) -> Any:
        """The ``MixedPrecisionPolicy`` every unit gets: ``mixed_precision`` if given, else from the Fabric
        precision (``"bf16-mixed"``: bf16 compute, fp32 gradient reduction)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        given = self.mixed_precision
        if given is None:
            dtype = _MIXED_DTYPES.get(getattr(self.precision, "precision", None))
            return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        if isinstance(given, MixedPrecisionPolicy):
            return given
        if all(hasattr(given, name) for name in ("param_dtype", "reduce_dtype", "buffer_dtype")):  # FSDP1's
            return MixedPrecisionPolicy(param_dtype=given.param_dtype, reduce_dtype=given.reduce_dtype,
                                        cast_forward_inputs=getattr(given, "cast_forward_inputs", True))  # fmt: skip
        raise TypeError(
            f"mixed_precision={given!r}: pass torch.distributed.fsdp.MixedPrecisionPolicy(param_dtype=...,"
            " reduce_dtype=...) (or FSDP1's MixedPrecision), or leave it None and set Fabric(precision='bf16-mixed')"
        )

    def offload_policy(self) -> Any:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        return CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda") if self.cpu_offload else OffloadPolicy()

    def configure(self, num_nodes: int) -> None:
        super().configure(num_nodes)
        if self._mesh_shape is not None and self._mesh_shape[0] * self._mesh_shape[1] != self.world_size:
            raise ValueError(f"device_mesh={self._mesh_shape} must multiply to the number of ranks ({self.world_size})")
        if self._hybrid and self._mesh_shape is None and self._mesh is None and self.world_size % self.num_nodes:
            raise ValueError(f"sharding_strategy={self.sharding_strategy} needs the same number of ranks on every node")

    def setup_environment(self) -> None:
        super().setup_environment()
        self.device_mesh  # noqa: B018 - every rank builds the mesh (and any groups it needs) now, together
        self._use_sharded_grad_scaler()

    # ----- the model -----------------------------------------------------------------------------
    def module_to_device(self, module: nn.Module) -> None:
        if self.cpu_offload:
            return  # fully_shard places the shards (on the CPU) and moves what runs to the device
        super().module_to_device(module)

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Checkpoint activations, shard the wrap units and then the root, materialise meta tensors."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        before = self._parameters_by_name(module)
        if not any(isinstance(m, FSDPModule) for m in module.modules()):  # the user may have sharded it already
            if self.sync_module_states:
                self._broadcast_module_states(module)
            units = self.configure_fsdp_auto_wrap_policy(module)
            self._apply_activation_checkpointing(module, units)
            wrapper_of = {id(getattr(m, _WRAPPED)): m for m in module.modules() if hasattr(m, _WRAPPED)}
            units = [wrapper_of.get(id(unit), unit) for unit in units]  # shard the checkpoint wrapper around a unit
            shard = partial(fully_shard, mesh=self.device_mesh, reshard_after_forward=self.reshard_after_forward,
                            mp_policy=self.mixed_precision_policy(), offload_policy=self.offload_policy(),
                            **self._fully_shard_kwargs)  # fmt: skip
            for unit in units:
                shard(unit)
            shard(module)
            if self.forward_prefetch:
                for unit, following in zip(units, units[1:]):
                    unit.set_modules_to_forward_prefetch([following])
            self._cast_buffers(module)
        device = torch.device("cpu") if self.cpu_offload else self.root_device
        return self._finish_module(module, before, device=device)

    def configure_fsdp_auto_wrap_policy(self, module: nn.Module) -> list[nn.Module]:
        """The submodules ``auto_wrap_policy`` makes FSDP units, children before parents (never the root)."""
        return select_modules(module, self.auto_wrap_policy)

    def _apply_activation_checkpointing(self, module: nn.Module, units: list[nn.Module]) -> None:
        policy = self.activation_checkpointing_policy
        if policy is None and not self._checkpoint_units:
            return
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
        )  # fmt: skip

        chosen = {id(m) for m in (units if policy is None else select_modules(module, policy))}
        if not chosen:
            raise ValueError(
                "activation checkpointing matched no layer of the model: name the layer classes,"
                " e.g. activation_checkpointing_policy={MyBlock}"
            )
        wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(module, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in chosen)

    def _cast_buffers(self, module: nn.Module) -> None:
        dtype = getattr(self.mixed_precision, "buffer_dtype", None)  # FSDP1's MixedPrecision casts buffers, FSDP2 not
        if dtype is None:
            return
        for sub in module.modules():
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.is_floating_point() and not buffer.is_meta:
                    sub._buffers[name] = buffer.to(dtype)

    def _broadcast_module_states(self, module: nn.Module) -> None:
        from ..collectives import ops

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if not tensor.is_meta:
                    tensor.copy_(ops.broadcast_tensor(tensor.detach().to(self.root_device), src=0))

    def _use_sharded_grad_scaler(self) -> None:
        """16-mixed: a scaler whose overflow check agrees over the ranks (every rank skips the same steps)."""
        scaler = getattr(self.precision, "scaler", None)
        if scaler is None or not self.distributed:
            return
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        if not isinstance(scaler, ShardedGradScaler):
            self.precision.scaler = ShardedGradScaler(
                device=self.root_device.type, init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
                backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval(),
                enabled=scaler.is_enabled(),
            )

    def backward_sync(self, module: nn.Module, enabled: bool) -> Optional[ContextManager]:
        from torch.distributed.fsdp import FSDPModule

        if enabled and not isinstance(module, FSDPModule):
            raise TypeError(
                "no_backward_sync needs the model returned by fabric.setup() (an FSDP module),"
                f" got {type(module).__name__}"
            )
        return self._gradient_sync_off(module, enabled)

    def __repr__(self) -> str:
        return (f"FSDPStrategy(sharding_strategy={self.sharding_strategy}, state_dict_type={self.state_dict_type!r},"
                f" cpu_offload={self.cpu_offload}, start_method={self.start_method})")  # fmt: skip


# ----- policies ----------------------------------------------------------------------------------
def select_modules(root: nn.Module, policy: Optional[Policy]) -> list[nn.Module]:
    """The submodules of ``root`` (children first, never ``root``) that ``policy`` picks."""
    if policy is None:
        return []
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(policy)
        return [m for m in post_order(root) if m is not root and isinstance(m, classes)]
    if hasattr(policy, "_run_policy"):  # torch's FSDP1 policy objects: ModuleWrapPolicy, CustomPolicy
        picked = policy._run_policy(root, set(), {})
        return [m for m in post_order(root) if m is not root and m in picked]
    if "recurse" in inspect.signature(policy).parameters:  # FSDP1 callable (module, recurse, nonwrapped_numel)
        picked_ids: set[int] = set()
        _visit(root, policy, picked_ids, is_root=True)
        return [m for m in post_order(root) if id(m) in picked_ids]
    return [m for m in post_order(root) if m is not root and policy(m)]


def _visit(module: nn.Module, policy: Callable[..., bool], picked: set[int], is_root: bool = False) -> int:
    """FSDP1's traversal: returns how many parameters ended up in picked units below (and at) ``module``."""
    numel = sum(p.numel() for p in module.parameters())
    if not policy(module=module, recurse=True, nonwrapped_numel=numel):
        return 0
    wrapped = sum(_visit(child, policy, picked) for child in module.children())
    if not is_root and policy(module=module, recurse=False, nonwrapped_numel=numel - wrapped):
        picked.add(id(module))
        return numel
    return wrapped


def _check_policy(policy: Any, argument: str) -> None:
    if policy is None or hasattr(policy, "_run_policy"):
        return
    if isinstance(policy, (set, frozenset, list, tuple)):
        bad = [item for item in policy if not (isinstance(item, type) and issubclass(item, nn.Module))]
        if bad:
            raise TypeError(
                f"{argument} holds {bad!r}: a set of layer classes must hold nn.Module subclasses,"
                " e.g. {nn.TransformerDecoderLayer}"
            )
        return
    if not callable(policy):
        raise TypeError(
            f"{argument}={policy!r}: pass a set of module classes, a function module -> bool, or an FSDP wrap policy"
        )
    try:
        parameters = inspect.signature(policy).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): trust it
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    unbound = [p.name for p in parameters if p.default is p.empty and p.kind in named
               and p.name not in ("module", "recurse", "nonwrapped_numel")]  # fmt: skip
    if unbound:
        name = getattr(policy, "__name__", type(policy).__name__)
        raise ValueError(
            f"{argument}={name} still needs {unbound}: bind them, e.g."
            f" functools.partial({name}, {unbound[0]}={{MyBlock}}), or pass the classes as a set: {{MyBlock}}"
        )


def _checkpointing(enabled: Any, policy: Optional[Policy], auto_wrap_policy: Any) -> tuple[bool, Optional[Policy]]:
    """``(checkpoint the wrap units, policy)`` from the two activation-checkpointing arguments."""
    if isinstance(enabled, type) or isinstance(enabled, (set, frozenset, list, tuple)):  # Lightning's older form
        if policy is not None:
            raise ValueError("Pass the layer classes once: activation_checkpointing_policy={MyBlock}")
        enabled, policy = True, {enabled} if isinstance(enabled, type) else enabled
    if enabled is False and policy is not None:
        raise ValueError("activation_checkpointing=False contradicts activation_checkpointing_policy: drop one of them")
    _check_policy(policy, "activation_checkpointing_policy")
    if enabled and policy is None and auto_wrap_policy is None:
        raise ValueError(
            "activation_checkpointing=True needs to know which layers to checkpoint: pass"
            " activation_checkpointing_policy={MyBlock} (or an auto_wrap_policy, whose units are then checkpointed)"
        )
    return bool(enabled) and policy is None, policy


def _offload_flag(cpu_offload: Any) -> bool:
    if cpu_offload is None or isinstance(cpu_offload, bool):
        return bool(cpu_offload)
    if hasattr(cpu_offload, "offload_params"):  # FSDP1's CPUOffload
        return bool(cpu_offload.offload_params)
    if type(cpu_offload).__name__ == "CPUOffloadPolicy":
        return True
    raise TypeError(f"cpu_offload={cpu_offload!r}: pass True/False (or torch's CPUOffload / CPUOffloadPolicy)")


def _sharding_name(sharding_strategy: Any) -> str:
    if sharding_strategy is None:
        return "FULL_SHARD"
    name = getattr(sharding_strategy, "name", sharding_strategy)
    name = name.upper() if isinstance(name, str) else name
    if name == "NO_SHARD":
        raise ValueError("sharding_strategy=NO_SHARD keeps a full replica on each rank: that is DDP, strategy='ddp'")
    if name not in _SHARDING:
        choices = [n for n in _SHARDING if not n.startswith("_")]
        raise ValueError(f"sharding_strategy={sharding_strategy!r} is not one of {choices}")
    return name


def _state_dict_type(state_dict_type: Any) -> str:
    if state_dict_type is None:
        return "full"
    name = getattr(state_dict_type, "name", state_dict_type)
    key = name.lower() if isinstance(name, str) else name
    if key not in _STATE_DICT_TYPES:
        raise ValueError(
            f"state_dict_type={state_dict_type!r}: choose 'full' (one file, loads anywhere) or 'sharded' (a directory)"
        )
    return _STATE_DICT_TYPES[key]


def _check_fully_shard_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = {"shard_placement_fn", "ignored_params"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"FSDPStrategy got unexpected arguments {unknown}; extra arguments go to fully_shard, which takes"
            f" {sorted(allowed)}"
        )
    return dict(kwargs)


def register_strategies(registry: Any) -> None:
    """Register ``"fsdp"`` (ranks re-run the script; a notebook ``launch()`` forks them) and ``"fsdp_cpu_offload"``."""
    registry.register("fsdp", FSDPStrategy, "FSDP2: parameters, gradients, optimizer sharded", start_method="popen")
    registry.register(
        "fsdp_cpu_offload", FSDPStrategy, "FSDP2, shards kept in CPU memory", start_method="popen", cpu_offload=True
    )
