"""Experiment loggers used by ``Fabric.log`` / ``Fabric.log_dict`` (called on rank 0 only).

Example:
    >>> from notebook_fabric.loggers import CSVLogger, TensorBoardLogger
    >>> loggers = [CSVLogger("logs"), TensorBoardLogger("logs")]  # doctest: +SKIP
    >>> # fabric = Fabric(loggers=loggers); fabric.log("loss", loss)

``TensorBoardLogger`` needs the optional extra ``pip install 'notebook-fabric[tensorboard]'``;
this package imports fine without it (the error is raised when the logger is built).
"""

from notebook_fabric.loggers.base import Logger
from notebook_fabric.loggers.csv_logs import CSVLogger
from notebook_fabric.loggers.tensorboard import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger"]
