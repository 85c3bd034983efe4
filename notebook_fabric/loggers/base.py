"""The :class:`Logger` interface and helpers shared by the built-in loggers.

A logger receives already-reduced scalar metrics (``Fabric.log`` / ``Fabric.log_dict``
call :meth:`Logger.log_metrics` on rank 0 only) and hyperparameters, and persists them.

Example:
    >>> from notebook_fabric.loggers import Logger
    >>> from notebook_fabric.loggers.base import normalize_metrics, params_to_dict
    >>> class PrintLogger(Logger):
    ...     name, version = "print", 0
    ...     def log_metrics(self, metrics, step=None):
    ...         print(step, normalize_metrics(metrics))
    ...     def log_hyperparams(self, params):
    ...         print(params_to_dict(params))
    >>> PrintLogger().log_metrics({"loss": 0.5}, step=3)
    3 {'loss': 0.5}
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import tempfile
from abc import ABC, abstractmethod
from argparse import Namespace
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

__all__ = [
    "Logger",
    "MetricValue",
    "normalize_metrics",
    "params_to_dict",
    "sanitize_params",
    "save_hparams_file",
    "next_version",
]

MetricValue = Union[float, int, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]

_VERSION_DIR = re.compile(r"^version_(\d+)$")


class Logger(ABC):
    """Base class for experiment loggers.

    Subclasses must implement :attr:`name`, :attr:`version`, :meth:`log_metrics` and
    :meth:`log_hyperparams`. :attr:`root_dir` / :attr:`log_dir` default to ``None`` for
    loggers that do not write to a local directory; :meth:`save` is a no-op and
    :meth:`finalize` calls :meth:`save`.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """Experiment name (the folder grouping all versions)."""

    @property
    @abstractmethod
    def version(self) -> Union[int, str]:
        """Experiment version (``version_<N>`` folder for ints, the string itself otherwise)."""

    @property
    def root_dir(self) -> Optional[str]:
        """Directory that contains all experiments, or ``None``."""
        return None

    @property
    def log_dir(self) -> Optional[str]:
        """Directory this logger writes to, or ``None``."""
        return None

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, MetricValue], step: Optional[int] = None) -> None:
        """Record a mapping of scalar metrics, optionally at ``step``."""

    @abstractmethod
    def log_hyperparams(self, params: Union[Mapping[str, Any], Namespace]) -> None:
        """Record hyperparameters (a mapping or an ``argparse.Namespace``)."""

    def save(self) -> None:
        """Persist anything still buffered. Default: nothing to do."""

    def finalize(self, status: str = "success") -> None:
        """Called once when training ends (``status`` is e.g. ``"success"`` / ``"failed"``)."""
        self.save()


class _DirectoryLogger(Logger):
    """A logger writing under ``root_dir/name/version``; shared by CSV and TensorBoard.

    The version is resolved once, at construction, without creating any directory,
    so several loggers built together with the same ``root_dir``/``name`` share one
    version folder, and processes that never log never touch the filesystem.
    """

    def __init__(
        self,
        root_dir: PathLike,
        name: Optional[str] = "notebook_fabric_logs",
        version: Union[int, str, None] = None,
        prefix: str = "",
    ) -> None:
        if isinstance(version, bool) or not (version is None or isinstance(version, (int, str))):
            raise TypeError(f"`version` must be an int, a str or None, got {version!r}")
        if isinstance(version, int) and version < 0:
            raise ValueError(f"`version` must be >= 0, got {version}")
        if isinstance(version, str) and not version:
            raise ValueError("`version` must not be an empty string")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {type(prefix).__name__}")
        self._root_dir = os.path.expanduser(os.path.expandvars(os.fspath(root_dir)))  # "~/logs", "$SCRATCH/logs"
        self._name = name or ""
        self._prefix = prefix
        self._version: Union[int, str] = (
            next_version(os.path.join(self._root_dir, self._name)) if version is None else version
        )
        self._next_step = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> Union[int, str]:
        return self._version

    @property
    def root_dir(self) -> str:
        return self._root_dir

    @property
    def log_dir(self) -> str:
        folder = self._version if isinstance(self._version, str) else f"version_{self._version}"
        return os.path.join(self._root_dir, self._name, folder)

    @property
    def prefix(self) -> str:
        return self._prefix

    def _resolve_step(self, step: Optional[int]) -> int:
        """Return ``step`` as an int; ``None`` means "one after the last step logged"."""
        if step is None:
            step = self._next_step
        elif isinstance(step, torch.Tensor):
            step = int(step.item())
        else:
            try:
                step = operator.index(step)
            except TypeError:
                raise TypeError(f"`step` must be an int or None, got {step!r}") from None
        self._next_step = step + 1
        return step


def next_version(experiment_dir: PathLike) -> int:
    """Return the next free ``N`` for a ``version_N`` folder inside ``experiment_dir``.

    Example:
        >>> next_version("/path/that/does/not/exist")
        0
    """
    try:
        entries = os.listdir(experiment_dir)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    used = [int(m.group(1)) for m in map(_VERSION_DIR.match, entries) if m]
    return max(used) + 1 if used else 0


def _to_number(key: str, value: Any) -> Union[int, float]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}."
                " Reduce it first (e.g. `.mean()`) or log its elements under separate names."
            )
        return float(value.item())
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)  # numpy scalars / 0-d arrays
    if callable(item) and getattr(value, "size", 1) == 1:
        try:
            return float(item())
        except (TypeError, ValueError):
            pass
    raise TypeError(f"Metric {key!r} must be a number or a scalar tensor, got {type(value).__name__}.")


def _join(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key}" if prefix else key


def normalize_metrics(
    metrics: Mapping[str, Any], prefix: str = "", flatten: bool = True
) -> Dict[str, Any]:
    """Convert metric values to Python numbers and apply ``prefix`` (joined with ``/``).

    Tensors become floats via ``.item()``; they must hold exactly one element.
    Nested mappings are flattened to ``"outer/inner"`` keys, or, with ``flatten=False``,
    kept as one level of ``{inner: number}`` dicts (what TensorBoard's ``add_scalars`` wants).

    Example:
        >>> normalize_metrics({"loss": torch.tensor(0.25), "acc": {"top1": 1}}, prefix="val")
        {'val/loss': 0.25, 'val/acc/top1': 1}
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be a mapping of name -> value, got {type(metrics).__name__}")
    out: Dict[str, Any] = {}
    for key, value in metrics.items():
        key = _join(prefix, str(key))
        if isinstance(value, Mapping):
            if flatten:
                out.update(normalize_metrics(value, prefix=key))
            else:
                out[key] = {str(k): _to_number(f"{key}/{k}", v) for k, v in value.items()}
        else:
            out[key] = _to_number(key, value)
    return out


def params_to_dict(params: Union[Mapping[str, Any], Namespace, None]) -> Dict[str, Any]:
    """Return hyperparameters as a plain ``dict`` (accepts a mapping, a Namespace or None).

    Example:
        >>> params_to_dict(Namespace(lr=0.1))
        {'lr': 0.1}
    """
    if params is None:
        return {}
    if isinstance(params, Namespace):
        return dict(vars(params))
    if isinstance(params, Mapping):
        return {str(k): v for k, v in params.items()}
    raise TypeError(f"Hyperparameters must be a dict or an argparse.Namespace, got {type(params).__name__}")


def sanitize_params(value: Any) -> Any:
    """Recursively turn hyperparameter values into YAML/JSON-safe builtins.

    Scalar tensors/numpy values become numbers, other tensors become lists, paths and
    enums their string/value, and anything else unknown its ``str()``.

    Example:
        >>> sanitize_params({"lr": torch.tensor(0.5), "dims": (1, 2), "dir": Path("runs")})
        {'lr': 0.5, 'dims': [1, 2], 'dir': 'runs'}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): sanitize_params(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [sanitize_params(v) for v in value]
    if isinstance(value, torch.Tensor):
        return sanitize_params(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Enum):
        return sanitize_params(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item, tolist = getattr(value, "item", None), getattr(value, "tolist", None)
    if callable(tolist):  # numpy arrays and scalars
        try:
            return sanitize_params(tolist())
        except Exception:
            pass
    if callable(item):
        try:
            return sanitize_params(item())
        except Exception:
            pass
    return str(value)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + ``os.replace`` (never a half-written file)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_hparams_file(log_dir: PathLike, params: Mapping[str, Any]) -> Path:
    """Write ``params`` to ``log_dir/hparams.yaml`` (PyYAML installed) or ``hparams.json``.

    Returns the path written.

    Example:
        >>> save_hparams_file(tmp_dir, {"lr": 0.1}).name in {"hparams.yaml", "hparams.json"}  # doctest: +SKIP
        True
    """
    os.makedirs(log_dir, exist_ok=True)
    data = sanitize_params(dict(params))
    try:
        import yaml  # optional; never a dependency
    except ImportError:
        path = Path(log_dir, "hparams.json")
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    else:
        path = Path(log_dir, "hparams.yaml")
        write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return path
