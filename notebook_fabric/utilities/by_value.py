"""Pickle functions and classes by value while keeping where their code came from.

cloudpickle ships a function defined in a notebook cell or in ``__main__`` by value. Since
cloudpickle 3.1 it rewrites every shipped code object's ``co_filename`` to ``"<dynamic-code>"``,
so a remote traceback or stack loses the cell's name and its source lines. This pickler keeps
cloudpickle for everything else and ships code objects through :mod:`marshal`, which keeps every
field (the ranks run the same interpreter as the notebook, so the format always matches).

Example::

    payload = dumps(train)          # in the notebook
    train = loads(payload)          # in a rank: train.__code__.co_filename is the cell's file
"""
from __future__ import annotations

import io
import marshal
import pickle
import types
from collections import ChainMap
from typing import Any

import cloudpickle

__all__ = ["FileKeepingPickler", "dumps", "loads"]


def _reduce_code(code: types.CodeType) -> Any:
    return marshal.loads, (marshal.dumps(code),)


class FileKeepingPickler(cloudpickle.Pickler):
    """cloudpickle's pickler, with code objects shipped through :mod:`marshal`."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """Like :func:`cloudpickle.dumps`, but code shipped by value keeps its file name and lines."""
    with io.BytesIO() as buffer:
        FileKeepingPickler(buffer, protocol=protocol).dump(obj)
        return buffer.getvalue()


loads = pickle.loads
