"""What a function's signature accepts, read without calling it (functions with no readable
signature, such as some builtins, are given the benefit of the doubt).

Example::

    >>> def on_epoch_end(fabric, epoch): ...
    >>> kwargs_accepted_by(on_epoch_end, {"epoch": 3, "loss": 0.1})
    {'epoch': 3}
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict


def takes_an_argument(function: Callable[..., Any]) -> bool:
    """Whether ``function`` can be called with one positional argument."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def kwargs_accepted_by(function: Callable[..., Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The part of ``kwargs`` that ``function`` takes by name (all of it if it takes ``**kwargs``)."""
    if not kwargs:
        return kwargs
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return kwargs
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {name: value for name, value in kwargs.items() if name in names}
