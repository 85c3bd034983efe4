"""Stacks and tracebacks as the user wants to read them: their own frames, the libraries' folded.

Every stack or traceback notebook-fabric shows (stall reports, timeouts, ``where``, errors from
ranks) passes through :func:`fold_frames`: each run of frames inside notebook_fabric or torch
becomes one line saying how many were hidden. ``NOTEBOOK_FABRIC_ALL_FRAMES=1`` (or
:func:`show_all_frames`) shows them all.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

ALL_FRAMES_VARIABLE = "NOTEBOOK_FABRIC_ALL_FRAMES"
_FRAME = re.compile(r'^(?P<indent>\s*)File "(?P<file>[^"]+)", line \d+')


def show_all_frames(enabled: bool = True) -> None:
    """Show (``True``) or fold (``False``) library frames from now on, in this process and ranks started later."""
    os.environ[ALL_FRAMES_VARIABLE] = "1" if enabled else "0"


def _showing_all() -> bool:
    return os.environ.get(ALL_FRAMES_VARIABLE, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_library(filename: str) -> bool:
    from ..collectives.callsite import is_library_file

    return is_library_file(filename)


def fold_frames(text: str, show_all: Optional[bool] = None) -> str:
    """``text`` (a formatted stack or traceback) with each run of library frames folded into one line."""
    if show_all if show_all is not None else _showing_all():
        return text
    lines = text.splitlines()
    out: List[str] = []
    hidden = 0
    hidden_indent = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        match = _FRAME.match(line)
        if not match:
            if hidden:
                out.append(_fold_line(hidden_indent, hidden))
                hidden = 0
            out.append(line)
            index += 1
            continue
        indent = match.group("indent")
        end = index + 1
        while end < len(lines) and not _FRAME.match(lines[end]) and _indent_of(lines[end]) > len(indent):
            end += 1
        if _is_library(match.group("file")):
            hidden += 1
            hidden_indent = indent
        else:
            if hidden:
                out.append(_fold_line(hidden_indent, hidden))
                hidden = 0
            out.extend(lines[index:end])
        index = end
    if hidden:
        out.append(_fold_line(hidden_indent, hidden))
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip()) if line.strip() else 10**6  # blank lines belong to the frame


def _fold_line(indent: str, count: int) -> str:
    return (f"{indent}... {count} frame{'s' if count != 1 else ''} inside notebook_fabric/torch hidden "
            f"({ALL_FRAMES_VARIABLE}=1 shows them)")
