"""Log to TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

TensorBoard is an optional extra: ``pip install 'notebook-fabric[tensorboard]'``.
Importing this module never imports tensorboard; constructing the logger does.

Example:
    >>> from notebook_fabric.loggers import TensorBoardLogger
    >>> logger = TensorBoardLogger("logs", name="mnist")      # logs/mnist/version_<N>/
    >>> logger.log_hyperparams({"lr": 1e-3})
    >>> logger.log_metrics({"loss": 0.5, "acc": {"train": 0.8, "val": 0.7}}, step=1)
    >>> logger.finalize("success")
    >>> # then: tensorboard --logdir logs   (or %tensorboard --logdir logs in Jupyter)
"""

from __future__ import annotations

import os
import warnings
from argparse import Namespace
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

import torch

from notebook_fabric.utilities.rank_zero import rank_zero_experiment, rank_zero_only
from notebook_fabric.loggers.base import (
    MetricValue,
    PathLike,
    _DirectoryLogger,
    normalize_metrics,
    params_to_dict,
    sanitize_params,
    save_hparams_file,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardLogger"]

_INSTALL_HINT = (
    "TensorBoardLogger requires the `tensorboard` package, which is not installed (or too old)."
    " Install it with: pip install 'notebook-fabric[tensorboard]'"
)

HP_METRIC = "hp_metric"


def _import_tensorboard() -> Any:
    """Return ``(SummaryWriter, hparams)`` or raise an ImportError with the install hint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return SummaryWriter, hparams


class TensorBoardLogger(_DirectoryLogger):
    """Write scalars, hyperparameters and graphs to ``root_dir/name/version_N[/sub_dir]``.

    The ``SummaryWriter`` is created on first use (see :attr:`experiment`), so building the
    logger on every rank costs nothing on ranks that never log.

    Args:
        root_dir: Directory holding all experiments (what you pass to ``tensorboard --logdir``).
        name: Experiment folder name (``""``/``None`` to write versions directly in ``root_dir``).
        version: ``None`` picks the next free ``version_N``; an int selects ``version_<int>``;
            a str is used as the folder name.
        default_hp_metric: When :meth:`log_hyperparams` gets no ``metrics``, register a
            placeholder ``hp_metric`` (value ``-1`` at step 0) so the HPARAMS tab shows the run.
            Log the real value later with ``log_metrics({"hp_metric": ...})``.
        prefix: Prepended to every metric name as ``"<prefix>/<name>"``.
        sub_dir: Optional extra folder inside the version folder (e.g. ``"train"``).
        **summary_writer_kwargs: Forwarded to ``SummaryWriter`` (``flush_secs``, ``max_queue``...).

    Raises:
        ImportError: tensorboard is not installed.

    Example:
        >>> logger = TensorBoardLogger("logs", sub_dir="fold_0", flush_secs=30)
        >>> logger.log_metrics({"val/loss": 0.42}, step=100)
        >>> logger.experiment.add_text("notes", "baseline run")   # raw SummaryWriter access
    """

    def __init__(
        self,
        root_dir: PathLike,
        name: Optional[str] = "notebook_fabric_logs",
        version: Union[int, str, None] = None,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: Optional[PathLike] = None,
        **summary_writer_kwargs: Any,
    ) -> None:
        self._writer_cls, self._hparams_summary = _import_tensorboard()
        if "log_dir" in summary_writer_kwargs or "logdir" in summary_writer_kwargs:
            raise TypeError("Pass `root_dir`/`name`/`version`/`sub_dir` instead of `log_dir` to TensorBoardLogger.")
        super().__init__(root_dir, name=name, version=version, prefix=prefix)
        self._default_hp_metric = bool(default_hp_metric)
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._writer_kwargs = summary_writer_kwargs
        self._experiment: Optional["SummaryWriter"] = None
        self._hparams: Dict[str, Any] = {}

    @property
    def log_dir(self) -> str:
        """``root_dir/name/version_N`` plus ``sub_dir`` when given; where event files go."""
        base = super().log_dir
        return os.path.join(base, self._sub_dir) if self._sub_dir else base

    @property
    def hparams(self) -> Dict[str, Any]:
        """A copy of all hyperparameters logged so far."""
        return dict(self._hparams)

    @property
    @rank_zero_experiment
    def experiment(self) -> "SummaryWriter":
        """The underlying ``SummaryWriter`` (created, with its folder, on first access); on ranks other
        than 0 a stand-in whose methods do nothing, so only rank 0 writes event files."""
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = self._writer_cls(log_dir=self.log_dir, **self._writer_kwargs)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, MetricValue], step: Optional[int] = None) -> None:
        """``add_scalar`` per metric; a dict value ``{"a": 1, "b": 2}`` goes to ``add_scalars``.

        ``step=None`` uses the step after the last one logged.

        Raises:
            ValueError: a tensor value has more than one element.
            TypeError: a value is not a number / tensor.
        """
        values = normalize_metrics(metrics, self._prefix, flatten=False)
        step = self._resolve_step(step)
        writer = self.experiment
        for key, value in values.items():
            if isinstance(value, dict):
                writer.add_scalars(key, value, step)
            else:
                writer.add_scalar(key, value, step)

    @rank_zero_only
    def log_hyperparams(
        self,
        params: Union[Mapping[str, Any], Namespace],
        metrics: Optional[Mapping[str, MetricValue]] = None,
    ) -> None:
        """Record hyperparameters for TensorBoard's HPARAMS tab and in ``hparams.yaml``/``.json``.

        Nested dicts are flattened to ``"outer/inner"`` names; values that are not
        bool/int/float/str become strings. ``metrics`` (name -> value, logged at step 0)
        are the metrics the HPARAMS tab tracks; see ``default_hp_metric``.
        """
        self._hparams.update(params_to_dict(params))
        save_hparams_file(self.log_dir, self._hparams)

        if metrics is None:
            metric_dict = {HP_METRIC: -1} if self._default_hp_metric else {}
        else:
            metric_dict = normalize_metrics(metrics)
        exp, ssi, sei = self._hparams_summary(_flat_hparams(self._hparams), metric_dict)
        writer = self.experiment
        file_writer = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for key, value in metric_dict.items():
            writer.add_scalar(key, value, 0)

    @rank_zero_only
    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:
        """Trace ``model`` on ``input_array`` (default: ``model.example_input_array``) and log its graph.

        A module returned by ``fabric.setup()`` is traced as the module you wrote. Without an example
        input (or with one TensorBoard cannot trace: not a tensor or a tuple of positional arguments)
        nothing is logged and a warning says why, as in Lightning.
        """
        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
        model = _unwrap_fabric_module(model)
        if input_array is None:
            warnings.warn(
                "Could not log the computational graph to TensorBoard: pass `input_array=` to log_graph, or set"
                " `model.example_input_array`.", UserWarning, stacklevel=3,
            )
            return
        if not isinstance(input_array, (torch.Tensor, tuple)):
            warnings.warn(
                f"Could not log the computational graph to TensorBoard: the example input is a"
                f" {type(input_array).__name__}, which TensorBoard cannot trace. Give a tensor, or a tuple of the"
                " positional arguments of the model's forward().", UserWarning, stacklevel=3,
            )
            return
        self.experiment.add_graph(model, input_array)

    @rank_zero_only
    def save(self) -> None:
        """Flush pending events to disk (no-op before the first write)."""
        if self._experiment is not None:
            self._experiment.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Flush and close the writer; logging again later opens a new event file."""
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
            self._experiment = None

    def __getstate__(self) -> Dict[str, Any]:
        # SummaryWriter owns threads and open files: a copy sent to another process
        # opens its own writer lazily.
        state = self.__dict__.copy()
        state["_experiment"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(log_dir={self.log_dir!r})"


def _flat_hparams(params: Mapping[str, Any], prefix: str = "") -> Dict[str, Union[bool, int, float, str]]:
    """Flatten nested params and coerce values to the types TensorBoard's hparams accept."""
    out: Dict[str, Union[bool, int, float, str]] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            out.update(_flat_hparams(value, name))
            continue
        value = sanitize_params(value)
        out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _unwrap_fabric_module(model: Any) -> Any:
    """The user's module behind what ``fabric.setup()`` returned (``model`` itself otherwise)."""
    from notebook_fabric.wrappers import _FabricModule

    return model._original_module if isinstance(model, _FabricModule) else model
