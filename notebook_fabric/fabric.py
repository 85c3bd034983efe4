"""The ``Fabric`` facade: one object that owns devices, precision, strategy and collectives.

Every method delegates: to the strategy (models, collectives, checkpoints), to ``launching/``
(processes), to the loggers and callbacks. Your training loop stays yours.
"""
from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Generator, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .checkpoint import io as checkpoint_io
from .collectives.collections import map_tensors, tensors_to_device
from .collectives.debug import enable_signature_checks
from .collectives.ops import normalize_reduce_op
from .connector import Connector
from .environments import ClusterEnvironment
from .launching.launchers import RankRecipe, select_launcher
from .launching.options import LaunchOptions
from .strategies import ParallelStrategy, Strategy
from .utilities.apply import apply_to_collection
from .utilities.data import shard_dataloader, with_seeded_workers
from .utilities.seed import seed_everything as _seed_everything
from .utilities.signatures import kwargs_accepted_by, takes_an_argument
from . import wrappers
from .wrappers import _FabricDataLoader, _FabricModule, _FabricOptimizer

class Fabric:
    """Scale a PyTorch training loop to any device, precision and strategy without rewriting it.

    >>> fabric = Fabric(accelerator="cpu", devices=1)
    >>> model, optimizer = fabric.setup(torch.nn.Linear(4, 1), torch.optim.SGD(...))  # doctest: +SKIP
    >>> fabric.backward(model(x).sum())  # doctest: +SKIP

    On several devices, start the ranks with :meth:`launch`: ``fabric.launch()`` in a script, or
    ``fabric.launch(train)`` with a function (the way to go in a notebook).
    """

    def __init__(
        self,
        accelerator: Union[str, Any] = "auto",
        strategy: Union[str, Strategy] = "auto",
        devices: Union[int, str, list[int]] = "auto",
        num_nodes: int = 1,
        precision: Union[str, int, Any, None] = None,
        plugins: Optional[Any] = None,
        callbacks: Optional[Union[list[Any], Any]] = None,
        loggers: Optional[Union[list[Any], Any]] = None,
        debug: bool = False,
    ) -> None:
        """``debug=True``: before each collective the ranks compare what they are about to call and raise
        :class:`~notebook_fabric.collectives.debug.CollectiveMismatchError` on every rank on a mismatch."""
        self._init_kwargs = _portable_kwargs(
            accelerator=accelerator, strategy=strategy, devices=devices, num_nodes=num_nodes,
            precision=precision, plugins=plugins, callbacks=callbacks, loggers=loggers, debug=debug,
        )  # fmt: skip
        connector = Connector(
            accelerator=accelerator, strategy=strategy, devices=devices, num_nodes=num_nodes,
            precision=precision, plugins=plugins,
        )  # fmt: skip
        self._connector = connector
        self._strategy: Strategy = connector.strategy
        self._accelerator = connector.accelerator
        self._precision = self._strategy.precision
        self._callbacks = _as_list(callbacks)
        self._loggers = _as_list(loggers)
        self._debug = bool(debug)
        self._launched = False
        self._prepared_outside = False  # prepared without launch(), the ranks having been created outside
        # How many modules setup() handed the strategy, and the last one, weakly: a strong reference would
        # keep a DDP module (and its process group's sockets) alive after the user dropped it.
        self._models_setup = 0
        self._last_setup_module: Optional[weakref.ref] = None

    # ----- what this rank is ---------------------------------------------------------------------
    @property
    def accelerator(self) -> Any:
        return self._accelerator

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def device(self) -> torch.device:
        """The device this rank computes on."""
        return self._strategy.root_device

    @property
    def global_rank(self) -> int:
        return self._strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self._strategy.local_rank

    @property
    def node_rank(self) -> int:
        return self._strategy.node_rank

    @property
    def world_size(self) -> int:
        return self._strategy.world_size

    @property
    def is_global_zero(self) -> bool:
        return self._strategy.is_global_zero

    @property
    def loggers(self) -> list[Any]:
        return self._loggers

    @property
    def logger(self) -> Any:
        """The first logger, or None."""
        return self._loggers[0] if self._loggers else None

    # ----- processes -----------------------------------------------------------------------------
    def launch(self, function: Optional[Callable[..., Any]] = None, *args: Any, start_method: Optional[str] = None,
               timeout: Optional[float] = None, return_all: bool = False, stall: Optional[float] = 30.0,
               sink: Any = None, log_dir: Any = None, dashboard: Optional[bool] = None, post_mortem: bool = False,
               **kwargs: Any) -> Any:
        """Start the ranks and prepare this process; with ``function``, run ``function(fabric, *args, **kwargs)`` on each.

        In a script with ``strategy="ddp"`` (or ``fsdp``, ``deepspeed``, ``model_parallel``),
        ``fabric.launch()`` re-runs the script for the other ranks (refused in a notebook or a REPL,
        where there is no script). ``fabric.launch(function)`` runs ``function`` on every rank and
        nothing else (in a script, a notebook or a REPL alike: the same supervised ranks as
        ``notebook_fabric.launch``), and rank 0's return value comes back here. The keywords
        ``start_method``, ``timeout``, ``return_all``, ``stall``, ``sink``, ``log_dir``, ``dashboard`` and
        ``post_mortem`` mean what they mean for :func:`notebook_fabric.launch`; the others go to ``function``.
        """
        _check_launch_function(function)
        name = getattr(function, "__qualname__", type(function).__name__)
        options = LaunchOptions(start_method=start_method, timeout=timeout, return_all=return_all, stall=stall,
                                sink=sink, log_dir=log_dir, dashboard=dashboard, post_mortem=post_mortem,
                                title=f"fabric.launch({name})" if function is not None else "fabric.launch()")
        return self._launch(function, args, kwargs, options)

    def _launch(self, function: Optional[Callable[..., Any]], args: tuple, kwargs: dict, options: LaunchOptions,
                fresh_processes: bool = False) -> Any:
        """``launch`` with its options gathered; ``fresh_processes`` (``notebook_fabric.launch``): run
        ``function`` in rank processes even where this process could be the only rank."""
        if self._launched and self._prepared_outside:  # the ranks came from outside and this one is ready
            self._prepared_outside = False
            return function(self, *args, **kwargs) if function is not None else None
        if self._launched:
            raise RuntimeError("fabric.launch() was already called for this Fabric; call it once")
        launcher = select_launcher(self._strategy, rank_recipe(self), runs_a_function=function is not None,
                                   fresh_processes=fresh_processes)
        return launcher.launch(function, tuple(args), dict(kwargs), options)

    # ----- models, optimizers, data --------------------------------------------------------------
    def setup(
        self, module: nn.Module, *optimizers: Optimizer, scheduler: Optional[Any] = None, move_to_device: bool = True
    ) -> Any:
        """Wrap ``module`` (and its ``optimizers``) for this strategy and precision.

        Returns the module alone, or ``(module, optimizer, ...)`` when optimizers are given, with the
        ``scheduler`` last when one is passed (``model, optimizer, scheduler = fabric.setup(model,
        optimizer, scheduler=scheduler)``). The scheduler is returned as it is: you step it.
        """
        if scheduler is not None and not optimizers:
            raise ValueError("setup(scheduler=...) needs the optimizer it drives: fabric.setup(model, optimizer, scheduler=...)")
        self._check_launched()
        self._check_not_wrapped(module, optimizers)
        original = module
        self._attach_to(original)
        module = self._precision.convert_module(module)
        if move_to_device:
            self._strategy.module_to_device(module)
        forward_module, optimizers_out = self._strategy.setup_module_and_optimizers(module, list(optimizers))
        wrapped = _FabricModule(forward_module, self._strategy, original_module=original)
        self._note_setup_module(forward_module)
        fabric_optimizers = [_FabricOptimizer(opt, self._strategy, self._callbacks) for opt in optimizers_out]
        self.call("on_after_setup", fabric=self, module=wrapped)
        if not fabric_optimizers:
            return wrapped
        return (wrapped, *fabric_optimizers, scheduler) if scheduler is not None else (wrapped, *fabric_optimizers)

    def setup_module(self, module: nn.Module, move_to_device: bool = True) -> nn.Module:
        """Wrap a module alone (set up its optimizers afterwards with :meth:`setup_optimizers`)."""
        self._check_launched()
        self._check_not_wrapped(module, ())
        original = module
        self._attach_to(original)
        module = self._precision.convert_module(module)
        if move_to_device:
            self._strategy.module_to_device(module)
        forward_module = self._strategy.setup_module(module)
        self._note_setup_module(forward_module)
        return _FabricModule(forward_module, self._strategy, original_module=original)

    def _note_setup_module(self, module: nn.Module) -> None:
        self._models_setup += 1
        self._last_setup_module = weakref.ref(module)

    def _attach_to(self, module: nn.Module) -> None:
        """A module with a ``_fabric`` attribute (a LightningModule) gets this Fabric, so that its
        ``self.log`` / ``self.logger`` go through it, as under Lightning."""
        if hasattr(module, "_fabric"):
            module._fabric = self

    def setup_optimizers(self, *optimizers: Optimizer) -> Any:
        self._check_not_wrapped(None, optimizers)
        wrapped = [_FabricOptimizer(self._strategy.setup_optimizer(opt), self._strategy, self._callbacks) for opt in optimizers]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def setup_dataloaders(
        self, *dataloaders: DataLoader, use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any:
        """Give each rank its own shard (the sampler is replaced under DDP) and move batches to the device."""
        if not dataloaders:
            raise ValueError("setup_dataloaders() needs at least one DataLoader")
        wrapped = [self._setup_dataloader(dl, use_distributed_sampler, move_to_device) for dl in dataloaders]
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def _setup_dataloader(self, loader: DataLoader, use_distributed_sampler: bool, move_to_device: bool) -> Any:
        if isinstance(loader, _FabricDataLoader):
            raise ValueError("This DataLoader was already set up with fabric.setup_dataloaders()")
        if not isinstance(loader, DataLoader):
            raise TypeError(f"setup_dataloaders() takes torch DataLoaders, got {type(loader).__name__}")
        sampler_kwargs = self._strategy.distributed_sampler_kwargs
        # with several ranks the sampler is replaced even for one replica (ranks of a tensor-parallel group
        # must read the same batches: a DistributedSampler seeded alike, not each rank's own RandomSampler)
        if use_distributed_sampler and sampler_kwargs is not None and self.world_size > 1:
            loader = shard_dataloader(loader, **sampler_kwargs)
        loader = self._strategy.process_dataloader(with_seeded_workers(loader, self.global_rank))
        return _FabricDataLoader(loader, device=self.device if move_to_device else None)

    # ----- the training step ---------------------------------------------------------------------
    def backward(self, tensor: Tensor, *args: Any, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        """``tensor.backward()``, with loss scaling and strategy hooks. Replaces ``loss.backward()``.

        Strategies that run the backward themselves (DeepSpeed) need the model: pass ``model=`` when
        more than one was set up.
        """
        module = model._forward_module if isinstance(model, _FabricModule) else model
        if module is None and self._models_setup == 1 and self._last_setup_module is not None:
            module = self._last_setup_module()
        with wrappers.in_fabric_backward():
            self._strategy.backward(tensor, module, *args, **kwargs)

    def clip_gradients(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        clip_val: Optional[Union[float, int]] = None,
        max_norm: Optional[Union[float, int]] = None,
        norm_type: Union[float, int, str] = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Optional[Tensor]:
        """Clip by value (``clip_val``) or by total norm (``max_norm``, returning the norm before clipping).

        Gradients are unscaled first under 16-mixed.
        """
        if (clip_val is None) == (max_norm is None):
            raise ValueError("clip_gradients() takes exactly one of clip_val= or max_norm=")
        if isinstance(norm_type, str):
            if norm_type.lower() not in ("inf", "infinity"):
                raise ValueError(f"norm_type={norm_type!r}: use a number or 'inf'")
            norm_type = float("inf")
        if max_norm is not None:
            return self._strategy.clip_gradients_norm(
                module, optimizer, max_norm=max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
            )
        self._strategy.clip_gradients_value(module, optimizer, clip_val=clip_val)
        return None

    def autocast(self) -> ContextManager:
        """The precision's autocast, for code outside the model's forward."""
        return self._precision.forward_context()

    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> ContextManager:
        """Skip the gradient all-reduce inside this block (gradient accumulation)."""
        if not isinstance(module, _FabricModule):
            raise TypeError("no_backward_sync() needs the module returned by fabric.setup()")
        context = self._strategy.backward_sync(module._forward_module, enabled)
        if context is None:
            warnings.warn(
                f"{type(self._strategy).__name__} cannot skip gradient synchronisation;"
                " no_backward_sync() does nothing here.",
                stacklevel=2,
            )
            return nullcontext()
        return context

    # ----- devices and values --------------------------------------------------------------------
    def to_device(self, obj: Any) -> Any:
        """Move a module, a tensor, or every tensor in a nested collection to this rank's device."""
        if isinstance(obj, nn.Module):
            self._strategy.module_to_device(obj)
            return obj
        device = self.device
        return apply_to_collection(obj, Tensor, lambda t: t.to(device))

    def init_tensor(self) -> ContextManager:
        """Tensors created inside land on the device, in the precision's dtype."""
        return self._strategy.tensor_init_context()

    def sharded_model(self) -> ContextManager:
        """Deprecated in Lightning in favour of :meth:`init_module`, which it is here."""
        warnings.warn("fabric.sharded_model() is deprecated: use fabric.init_module()", DeprecationWarning, stacklevel=2)
        return self.init_module()

    def init_module(self, empty_init: Optional[bool] = None) -> ContextManager:
        """Modules created inside land on the device in the right dtype (on the meta device where the strategy shards)."""
        self._check_launched()
        return self._strategy.module_init_context(empty_init=empty_init)

    @staticmethod
    def seed_everything(seed: Optional[int] = None, workers: Optional[bool] = None, verbose: bool = True) -> int:
        """Seed Python, NumPy and torch on this rank (and the ranks it starts); see :func:`seed_everything`.

        ``workers=None`` means True here: DataLoader workers are seeded too."""
        return _seed_everything(seed, workers=True if workers is None else workers, verbose=verbose)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self.is_global_zero:
            print(*args, **kwargs)

    # ----- collectives ---------------------------------------------------------------------------
    def barrier(self, name: Optional[str] = None) -> None:
        """Wait until every rank gets here. ``name`` appears in stall reports and the dashboard."""
        self._check_launched()
        self._strategy.barrier(name=name)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``src``'s value on every rank: a tensor, or any picklable object."""
        self._check_launched()
        return self._strategy.broadcast(obj, src=src)

    def all_gather(self, data: Any, group: Optional[Any] = None, sync_grads: bool = False) -> Any:
        """Every rank's tensors, stacked on a new first dimension (collections gathered leaf by leaf).

        Python bools (as uint8), ints, floats and NumPy arrays are turned into tensors first, so
        ``all(fabric.all_gather(ok))`` works. With one rank no dimension is added.
        """
        self._check_launched()
        strategy = self._strategy
        data = tensors_to_device(data, self.device)
        return map_tensors(data, lambda t: strategy.all_gather(t, group=group, sync_grads=sync_grads))

    def all_reduce(self, data: Any, group: Optional[Any] = None, reduce_op: Union[str, Any] = "mean") -> Any:
        """The reduction (sum, mean, max, min) over ranks; the caller's tensors are not modified."""
        normalize_reduce_op(reduce_op)  # the same error on one process as on many
        self._check_launched()
        strategy = self._strategy
        if isinstance(data, Tensor):  # the common case, without the collection walk or a device lookup
            if data.is_cpu and self._on_cpu():
                return strategy.all_reduce(data, group=group, reduce_op=reduce_op)
            device = strategy.root_device
            return strategy.all_reduce(data if data.device == device else data.to(device), group=group, reduce_op=reduce_op)
        data = tensors_to_device(data, self.device)
        return map_tensors(data, lambda t: strategy.all_reduce(t, group=group, reduce_op=reduce_op))

    def _on_cpu(self) -> bool:
        """Whether this rank computes on the CPU (looked up once: a rank's device does not change)."""
        on_cpu = self.__dict__.get("_cpu_rank")
        if on_cpu is None:
            on_cpu = self.__dict__["_cpu_rank"] = self._strategy.root_device.type == "cpu"
        return on_cpu

    @contextmanager
    def rank_zero_first(self, local: bool = False) -> Generator[None, None, None]:
        """Rank 0 (of the node, with ``local=True``) runs the block first; the others wait, then run it."""
        rank = self.local_rank if local else self.global_rank
        if rank > 0:
            self.barrier("rank_zero_first")
        yield
        if rank == 0:
            self.barrier("rank_zero_first")

    # ----- checkpoints ---------------------------------------------------------------------------
    def save(self, path: Union[str, Path], state: dict[str, Any], filter: Optional[dict[str, Callable]] = None) -> None:
        """Save ``state`` (modules and optimizers are turned into state dicts); rank 0 writes, everyone waits.

        Call it on every rank, not under ``if fabric.is_global_zero:``: the other ranks must reach
        the wait (and sharded strategies gather the state from every rank first).
        """
        self._check_launched()
        self._strategy.save_checkpoint(path, state, filter=filter)

    def load(
        self, path: Union[str, Path], state: Optional[dict[str, Any]] = None, strict: bool = True, *,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Restore ``state`` in place and return the rest of the checkpoint (all of it when ``state`` is None).

        ``weights_only=True``: unpickle only tensors and plain containers (default False: Fabric's own
        checkpoints hold optimizer states and your objects)."""
        self._check_launched()
        if not weights_only:
            return self._strategy.load_checkpoint(path, state=state, strict=strict)
        if "weights_only" not in inspect.signature(self._strategy.load_checkpoint).parameters:
            raise NotImplementedError(f"{type(self._strategy).__name__} reads its checkpoints itself: load(weights_only=True) is not possible there")
        return self._strategy.load_checkpoint(path, state=state, strict=strict, weights_only=True)

    def load_raw(
        self, path: Union[str, Path], obj: Union[nn.Module, Optimizer], strict: bool = True, *,
        weights_only: Optional[bool] = None,
    ) -> None:
        """Load a plain ``torch.save``-d state dict (not written by Fabric) into a module or optimizer.

        ``weights_only`` (default True): unpickle tensors and plain containers only; pass False for a
        file you trust that holds other objects."""
        state_dict = checkpoint_io.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only)
        if isinstance(obj, nn.Module):
            self._strategy.load_module_state_dict(obj, state_dict, strict=strict)
        elif isinstance(obj, Optimizer) or isinstance(getattr(obj, "_optimizer", None), Optimizer):
            self._strategy.load_optimizer_state(obj, state_dict)
        else:
            raise TypeError(f"load_raw() loads into a module or an optimizer, got {type(obj).__name__}")

    # ----- callbacks and loggers -----------------------------------------------------------------
    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Run ``hook_name(*args, **kwargs)`` on every callback that defines it.

        Each hook gets only the keyword arguments its signature takes (all of them when it has
        ``**kwargs``, or when its signature cannot be read), as in Lightning.
        """
        for callback in self._callbacks:
            method = getattr(callback, hook_name, None)
            if method is None:
                continue
            if not callable(method):
                warnings.warn(f"Skipping the callback `{type(callback).__name__}.{hook_name}` because it is not callable.",
                              UserWarning, stacklevel=2)
                continue
            method(*args, **kwargs_accepted_by(method, kwargs))

    def log(self, name: str, value: Any, step: Optional[int] = None) -> None:
        """Send one scalar to every logger (rank 0 only)."""
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """Send scalars to every logger (rank 0 only)."""
        if not self._loggers or not self.is_global_zero:
            return
        metrics = apply_to_collection(metrics, Tensor, _tensor_to_scalar)
        for logger in self._loggers:
            logger.log_metrics(metrics=metrics, step=step)

    def _finalize_loggers(self, status: str = "success") -> None:
        """Flush and close every logger; launchers call it when a rank ends (buffers would be lost at os._exit)."""
        for logger in self._loggers:
            try:
                logger.finalize(status)
            except Exception as error:  # noqa: BLE001 - one broken logger must not hide the run's outcome
                warnings.warn(f"{type(logger).__name__}.finalize({status!r}) failed: {error}", stacklevel=2)

    # ----- checks --------------------------------------------------------------------------------
    def _check_launched(self) -> None:
        """Ready to talk to the other ranks: where they were created outside (``notebook-fabric run``,
        torchrun, SLURM), prepare this one now, as ``launch()`` would; else insist on ``launch()``."""
        strategy = self._strategy
        if self._launched or not (isinstance(strategy, ParallelStrategy) and strategy.world_size > 1):
            return
        environment = strategy.cluster_environment
        if environment is not None and environment.creates_processes_externally:
            self._prepare_this_rank()
            self._prepared_outside = True
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                "This Fabric runs on several ranks: call fabric.launch() first"
                " (or fabric.launch(train_fn) from a notebook)."
            )

    def _prepare_this_rank(self) -> None:
        self._launched = True
        self._strategy.setup_environment()
        if self._debug:
            enable_signature_checks()

    @staticmethod
    def _check_not_wrapped(module: Optional[nn.Module], optimizers: Iterable[Any]) -> None:
        if isinstance(module, _FabricModule):
            raise ValueError("This model was already set up with fabric.setup(); pass the original model")
        if any(isinstance(opt, _FabricOptimizer) for opt in optimizers):
            raise ValueError("This optimizer was already set up with fabric.setup(); pass the original optimizer")


def rank_recipe(fabric: Fabric) -> RankRecipe:
    """What a launcher is handed to start ``fabric``'s ranks (see ``launching.launchers.RankRecipe``)."""
    return RankRecipe(fabric=fabric, prepare=prepare_rank, rebuild=fabric._init_kwargs, build=build_rank_fabric)


def prepare_rank(fabric: Fabric) -> None:
    """Make ``fabric`` a working rank once its process is one: the strategy's environment (process
    group, device) and, with ``debug=True``, the collective signature checks. Every launcher calls this."""
    fabric._prepare_this_rank()


def build_rank_fabric(fabric_kwargs: Mapping[str, Any]) -> Fabric:
    """In a new rank process (its torchrun variables set): ``Fabric(**fabric_kwargs)``, prepared as a rank.
    A launcher hands this to its ranks (``RankPool(make_fabric=)``); it travels by reference."""
    fabric = Fabric(**fabric_kwargs)
    fabric.launch()  # LOCAL_RANK is set: starts nothing, prepares this rank
    return fabric


def seed_everything(seed: Optional[int] = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python, NumPy and torch; see :func:`notebook_fabric.utilities.seed.seed_everything`."""
    return _seed_everything(seed, workers=workers, verbose=verbose)


def _check_launch_function(function: Optional[Callable[..., Any]]) -> None:
    if function is not None and not callable(function):
        raise TypeError(f"fabric.launch() takes a function to run on every rank, got {type(function).__name__}")
    if function is not None and not takes_an_argument(function):
        raise TypeError(
            f"fabric.launch({getattr(function, '__name__', 'fn')}) needs a function that takes the Fabric as its"
            " first argument: def train(fabric): ..."
        )


def _tensor_to_scalar(tensor: Tensor) -> Any:
    """The number in a one-element tensor; ``ValueError`` for any other (loggers take scalars)."""
    if tensor.numel() != 1:
        raise ValueError(
            f"fabric.log / log_dict got a tensor of shape {tuple(tensor.shape)}: it cannot be converted to a scalar."
            " Log one number per name (e.g. tensor.mean()), or call the logger's own API for tensors."
        )
    return tensor.item()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _portable_kwargs(**kwargs: Any) -> dict[str, Any]:
    """The constructor arguments for rebuilding this Fabric in a rank: strategies and cluster
    environments are copied before the connector configures them in place; everything else
    (callbacks, loggers, precision plugins) is kept as given."""
    return {key: _unconfigured(value) for key, value in kwargs.items()}


def _unconfigured(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_unconfigured(item) for item in value)
    if isinstance(value, (Strategy, ClusterEnvironment)):
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - an object that cannot be copied travels as it is
            return value
    return value
