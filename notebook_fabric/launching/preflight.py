"""Checks that run before any rank starts: the start method, CUDA and fork, picklability."""
from __future__ import annotations

import multiprocessing
import sys
from typing import Any, Callable, Dict, Mapping, Optional

from ..strategies.start_methods import POOL_START_METHODS, check_start_method

FORK_AFTER_CUDA = (
    "CUDA is already initialised in this process (something ran on the GPU, called torch.cuda.init(), "
    "or a library did), and a forked rank cannot use CUDA after that. Either pass start_method='spawn' "
    "(or 'forkserver'), or restart the kernel and launch before anything touches the GPU "
    "(torch.cuda.is_available() and torch.cuda.device_count() are fine; tensor.cuda() is not)."
)


def cuda_initialized() -> bool:
    """Whether this process already initialised CUDA (without initialising it by asking)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def resolve_start_method(requested: Optional[str], notify: Callable[[str], None] = lambda text: None) -> str:
    """The start method to use; ``notify`` hears about an automatic switch.

    ``None`` means fork where it is safe (Linux, CUDA not yet initialised here), else spawn. An
    explicit ``"fork"`` after CUDA was initialised is refused with what to do instead.
    """
    check_start_method(requested, POOL_START_METHODS, none_allowed=True)
    available = multiprocessing.get_all_start_methods()
    if requested is None:
        if "fork" in available and sys.platform.startswith("linux") and not cuda_initialized():
            return "fork"
        if cuda_initialized():
            notify("CUDA is already initialised in this process, so ranks start with 'spawn' instead of 'fork' "
                   "(slower to start; functions and arguments are sent with cloudpickle).")
        return "spawn"
    if requested not in available:
        raise ValueError(f"start_method={requested!r} is not available on this platform; use one of {available}")
    if requested == "fork" and cuda_initialized():
        raise RuntimeError(FORK_AFTER_CUDA)
    return requested


class UnpicklableError(TypeError):
    """Something that must travel to the ranks cannot be pickled; names what and why."""


def check_picklable(items: Mapping[str, Any], start_method: str) -> Dict[str, bytes]:
    """cloudpickle every value of ``items`` (keys describe them: ``"argument 2 of fn"``).

    Returns the pickles; raises :class:`UnpicklableError` naming the first value that fails.
    """
    from notebook_fabric.utilities import by_value

    pickled = {}
    for description, value in items.items():
        try:
            pickled[description] = by_value.dumps(value)
        except Exception as error:
            raise UnpicklableError(
                f"{description} (a {type(value).__module__}.{type(value).__qualname__}) cannot be sent to the ranks: "
                f"start_method={start_method!r} sends it with cloudpickle, which fails with "
                f"{type(error).__name__}: {error}. Create it inside the function instead, pass something "
                "picklable (e.g. a path or a config), or use start_method='fork', which inherits objects "
                "instead of pickling them."
            ) from error
    return pickled
