"""Inside a rank: a rank is never the kernel.

A rank forked from a Jupyter kernel inherits the kernel's IPython shell, its ipykernel
application, its comm manager and its zmq sockets. Left alone, ``tqdm.auto`` sees a running
kernel and builds an ipywidgets bar whose messages the kernel's session refuses to send from a
fork ("attempted to send message from fork"): the bar is lost and the kernel log fills up.
:func:`forget_kernel` drops that state in the rank (under every start method; only fork has
any), so that

- ``IPython.get_ipython()`` returns ``None`` and ``display()`` prints text, as outside a kernel;
- new widgets get the ``comm`` package's do-nothing comm, and no Jupyter session sends anything;
- ``tqdm.notebook``'s bar (and so ``tqdm.auto``'s, imported in the notebook or in the rank) is
  the text bar, whose progress the launcher reports as :class:`~notebook_fabric.live.events.Progress`.
"""
from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import sys
from typing import Any, Optional, Sequence

#: what ``tqdm.notebook.tqdm_notebook`` overrides of the text bar; removed in ranks
_NOTEBOOK_BAR_OVERRIDES = ("status_printer", "display", "colour", "__init__", "__iter__", "update", "close",
                           "clear", "reset")


def _no_ipython() -> None:
    """What ``get_ipython()`` returns in a rank."""
    return None


def forget_kernel() -> None:
    """Drop the kernel's IPython, ipykernel, comm and session state inherited by this rank."""
    _forget_shell()
    _forget_comms()
    _silence_sessions()
    if "tqdm.notebook" in sys.modules:
        text_bar_for_notebook_tqdm(sys.modules["tqdm.notebook"])
    else:
        sys.meta_path.insert(0, _PatchOnImport())


def _forget_shell() -> None:
    interactive = sys.modules.get("IPython.core.interactiveshell")
    if interactive is not None:
        shell = getattr(interactive.InteractiveShell, "_instance", None)
        if shell is not None:
            user_ns = getattr(shell, "user_ns", None)
            if isinstance(user_ns, dict) and "get_ipython" in user_ns:
                user_ns["get_ipython"] = _no_ipython  # functions from cells look it up in their globals
            type(shell).clear_instance()
            interactive.InteractiveShell.clear_instance()
    if getattr(builtins, "get_ipython", None) is not None:  # IPython's builtin trap, active while a cell runs
        builtins.get_ipython = _no_ipython  # type: ignore[attr-defined]
    kernelapp = sys.modules.get("ipykernel.kernelapp")
    if kernelapp is not None and getattr(kernelapp.IPKernelApp, "_instance", None) is not None:
        type(kernelapp.IPKernelApp._instance).clear_instance()
    kernelbase = sys.modules.get("ipykernel.kernelbase")
    if kernelbase is not None and getattr(kernelbase.Kernel, "_instance", None) is not None:
        type(kernelbase.Kernel._instance).clear_instance()


def _forget_comms() -> None:
    comm = sys.modules.get("comm")
    if comm is None:
        return
    comm.create_comm = comm._create_comm  # the package's DummyComm: sends nothing
    comm.get_comm_manager = comm._get_comm_manager
    comm._comm_manager = None


def _silence_sessions() -> None:
    """Jupyter sessions inherited from the kernel drop what they are asked to send."""
    session = sys.modules.get("jupyter_client.session")
    if session is not None:
        session.Session.send = _dropped_send  # type: ignore[assignment]


def _dropped_send(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def text_bar_for_notebook_tqdm(module: Any) -> None:
    """Make ``module.tqdm_notebook`` (``tqdm.notebook``) behave as tqdm's text bar."""
    cls = getattr(module, "tqdm_notebook", None)
    if cls is None:
        return
    for name in _NOTEBOOK_BAR_OVERRIDES:
        if name in vars(cls):
            delattr(cls, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Turns ``tqdm.notebook`` into the text bar as soon as the rank imports it."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname != "tqdm.notebook":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        text_bar_for_notebook_tqdm(module)
