"""A dependency-free logger that writes metrics to a CSV file.

Example:
    >>> from notebook_fabric.loggers import CSVLogger
    >>> logger = CSVLogger("logs", name="mnist")          # logs/mnist/version_<N>/
    >>> logger.log_hyperparams({"lr": 1e-3, "batch_size": 64})
    >>> for step in range(3):
    ...     logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    >>> logger.finalize("success")                        # flushes metrics.csv
    >>> import pandas as pd; pd.read_csv(logger.metrics_file_path)  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import csv
import io
import os
import warnings
import weakref
from argparse import Namespace
from typing import Any, Dict, List, Mapping, Optional, Union

from notebook_fabric.utilities.rank_zero import global_rank, rank_zero_experiment, rank_zero_only
from notebook_fabric.loggers.base import (
    MetricValue,
    PathLike,
    _DirectoryLogger,
    normalize_metrics,
    params_to_dict,
    save_hparams_file,
    write_text_atomic,
)

__all__ = ["CSVLogger"]

_STEP = "step"


class CSVLogger(_DirectoryLogger):
    """Log metrics to ``root_dir/name/version_N/metrics.csv`` and hyperparameters next to it.

    Rows are buffered in memory (:attr:`metrics`) and written by :meth:`save` every
    ``flush_logs_every_n_steps`` :meth:`log_metrics` calls, on :meth:`finalize` (and at
    interpreter exit). The columns are every metric name seen so far and ``step``, sorted by
    name (as in Lightning); when new names appear, the file is rewritten with the wider header
    through a temporary file and ``os.replace``, so a crash never leaves a half-rewritten CSV.
    Cells of metrics a row did not log are empty.

    Args:
        root_dir: Directory holding all experiments.
        name: Experiment folder name (``""``/``None`` to write versions directly in ``root_dir``).
        version: ``None`` picks the next free ``version_N``; an int selects ``version_<int>``;
            a str is used as the folder name. An existing ``metrics.csv`` there is replaced by the
            first write, with a warning when the logger is built (as in Lightning).
        prefix: Prepended to every metric name as ``"<prefix>/<name>"``.
        flush_logs_every_n_steps: How many ``log_metrics`` calls to buffer before writing.

    Example:
        >>> import torch
        >>> logger = CSVLogger("logs", flush_logs_every_n_steps=50)
        >>> logger.log_metrics({"train/loss": torch.tensor(0.3)}, step=10)
        >>> logger.save()
    """

    def __init__(
        self,
        root_dir: PathLike,
        name: Optional[str] = "notebook_fabric_logs",
        version: Union[int, str, None] = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        if isinstance(flush_logs_every_n_steps, bool) or not isinstance(flush_logs_every_n_steps, int):
            raise TypeError(f"`flush_logs_every_n_steps` must be an int, got {flush_logs_every_n_steps!r}")
        if flush_logs_every_n_steps < 1:
            raise ValueError(f"`flush_logs_every_n_steps` must be >= 1, got {flush_logs_every_n_steps}")
        super().__init__(root_dir, name=name, version=version, prefix=prefix)
        self._flush_every = flush_logs_every_n_steps
        self._columns: List[str] = [_STEP]
        self._known = {_STEP}
        self._pending: List[Dict[str, Any]] = []
        self._disk_header: Optional[List[str]] = None  # None: file not inspected yet
        self._hparams: Dict[str, Any] = {}
        self._replace_existing = global_rank() == 0 and os.path.isfile(self.metrics_file_path)
        if self._replace_existing:
            warnings.warn(
                f"Experiment logs directory {self.log_dir} exists and is not empty. Its metrics.csv will be replaced"
                " when the new metrics are saved; pass another `version=` to keep it.", UserWarning, stacklevel=2,
            )
        self._register_exit_flush()

    # ------------------------------------------------------------------ properties
    @property
    def metrics_file_path(self) -> str:
        """Path of the ``metrics.csv`` file (it exists once something was flushed)."""
        return os.path.join(self.log_dir, "metrics.csv")

    @property
    @rank_zero_experiment
    def experiment(self) -> "CSVLogger":
        """The object that writes: this logger itself on rank 0 (``log_metrics``, ``log_hyperparams``,
        ``save``), a stand-in whose methods do nothing on the other ranks."""
        return self

    @property
    def metrics(self) -> List[Dict[str, Any]]:
        """The rows logged since the last write (Lightning's ``logger.experiment.metrics``)."""
        return self._pending

    @property
    def hparams(self) -> Dict[str, Any]:
        """A copy of all hyperparameters logged so far."""
        return dict(self._hparams)

    # ------------------------------------------------------------------ logging
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, MetricValue], step: Optional[int] = None) -> None:
        """Buffer one row; ``step=None`` uses the step after the last one logged.

        Raises:
            ValueError: a tensor value has more than one element, or a metric is named ``"step"``.
            TypeError: a value is not a number / tensor.
        """
        row = normalize_metrics(metrics, self._prefix)
        if _STEP in row:
            raise ValueError(f"{_STEP!r} is reserved for the step column; pass it as `step=` instead.")
        row[_STEP] = self._resolve_step(step)
        known = self._known
        if not known.issuperset(row):
            known.update(row)
            self._columns = sorted(known)
        self._pending.append(row)
        if len(self._pending) >= self._flush_every:
            self.save()

    @rank_zero_only
    def log_hyperparams(self, params: Union[Mapping[str, Any], Namespace]) -> None:
        """Merge ``params`` into the saved hyperparameters and rewrite the hparams file now."""
        self._hparams.update(params_to_dict(params))
        save_hparams_file(self.log_dir, self._hparams)

    @rank_zero_only
    def save(self) -> None:
        """Write buffered rows to ``metrics.csv``."""
        self._flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Write buffered rows; the logger stays usable afterwards."""
        self._flush()

    # ------------------------------------------------------------------ internals
    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.metrics_file_path
        os.makedirs(self.log_dir, exist_ok=True)
        exists = os.path.isfile(path) and not self._replace_existing
        self._replace_existing = False
        if not exists:
            self._disk_header = []
        elif self._disk_header is None:  # a copy of this logger in another process wrote it: read its columns
            self._disk_header = _read_header(path)
            self._known.update(self._disk_header)
            self._columns = sorted(self._known)

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, restval="", lineterminator="\n")
        if self._disk_header == self._columns:
            writer.writerows(self._pending)
            with open(path, "a", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
        else:
            writer.writeheader()
            if exists and self._disk_header:
                with open(path, encoding="utf-8", newline="") as f:
                    writer.writerows(csv.DictReader(f))
            writer.writerows(self._pending)
            write_text_atomic(path, buf.getvalue())
            self._disk_header = list(self._columns)
        self._pending.clear()

    def _register_exit_flush(self) -> None:
        ref = weakref.ref(self)

        def _flush_at_exit() -> None:
            logger = ref()
            if logger is not None:
                try:
                    logger._flush()
                except Exception:
                    pass

        atexit.register(_flush_at_exit)

    def __getstate__(self) -> Dict[str, Any]:
        # A copy sent to another process starts with an empty buffer (the original still
        # owns its pending rows) and re-reads the header from disk before its first write.
        state = self.__dict__.copy()
        state["_pending"] = []
        state["_disk_header"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register_exit_flush()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(log_dir={self.log_dir!r})"


def _read_header(path: str) -> List[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])
