"""Where the launcher's own messages go: informational ones are not painted red in a notebook.

JupyterLab and Notebook paint a cell's stderr red, so an informational message there ("started
2 ranks ...") makes a healthy cell look failed. In a kernel, ``info`` messages go to stdout;
warnings and errors stay on stderr. Outside a kernel every launcher message goes to stderr, so a
script's stdout holds only what the script prints.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


def in_kernel() -> bool:
    """Whether this process is a running Jupyter kernel (an IPython shell under ``IPKernelApp``)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def notice_stream(level: str = "info") -> Any:
    """The stream for a launcher message of ``level`` (looked up late: kernels swap streams per cell)."""
    name = "stdout" if level == "info" and in_kernel() else "stderr"
    stream = getattr(sys, name, None)
    return stream if stream is not None else (sys.__stdout__ if name == "stdout" else sys.__stderr__)


def write_notice(lines: Iterable[str], level: str = "info") -> None:
    """``[notebook-fabric] line`` for each line, on the stream for ``level``."""
    stream = notice_stream(level)
    stream.write("".join(f"[notebook-fabric] {line}\n" for line in lines))
    try:
        stream.flush()
    except (AttributeError, ValueError, OSError):
        pass
