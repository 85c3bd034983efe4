"""Where in the user's code a collective was called: the innermost frame outside the libraries.

Frames inside notebook-fabric, torch and ``contextlib`` are skipped. The walk is a few attribute
reads per frame, cheap enough for every collective; the text (with the source line) is built only
when someone reads it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import linecache
import os
import sys
from types import FrameType
from typing import Dict, Optional, Tuple

import torch

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _magics_dir() -> Tuple[str, ...]:
    """The magics' source folder (a package of its own in the source tree), without importing IPython."""
    try:
        spec = importlib.util.find_spec("notebook_fabric.magics")
    except (ImportError, ValueError):
        return ()
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(os.path.abspath(p) + os.sep for p in spec.submodule_search_locations)


@functools.lru_cache(maxsize=1)
def library_dirs() -> Tuple[str, ...]:
    """Where library code lives (ours, torch's, the magics'), found on first use rather than at import."""
    return (_PACKAGE_DIR, _TORCH_DIR, *_magics_dir(), contextlib.__file__)

CELL_PREFIX = "<fabric-cell-"

Place = Tuple[str, int, str]  # (filename, line number, function)


def user_place(depth: int = 2) -> Optional[Place]:
    """``(file, line, function)`` of the innermost caller outside the libraries, ``depth`` frames up."""
    try:
        frame: Optional[FrameType] = sys._getframe(depth)
    except ValueError:
        return None
    return place_of(frame)


_LIBRARY_FILES: Dict[str, bool] = {}  # file name -> inside the libraries (a string caches its hash; a code object does not)


def place_of(frame: Optional[FrameType]) -> Optional[Place]:
    """The first frame from ``frame`` outwards that is the user's, as a :data:`Place`."""
    known = _LIBRARY_FILES
    while frame is not None:
        filename = frame.f_code.co_filename
        inside = known.get(filename)
        if inside is None:
            if len(known) > 20_000:  # a new file name per cell run: start over now and then
                known.clear()
            inside = known[filename] = filename.startswith(library_dirs())
        if not inside:
            break
        frame = frame.f_back
    if frame is None:
        return None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def source_line(place: Place) -> str:
    """The stripped text of the line at ``place`` ("" when the source is unknown)."""
    return linecache.getline(place[0], place[1]).strip()


def describe_place(place: Optional[Place], with_source: bool = True) -> str:
    """``cell line 9: fabric.backward(loss)`` or ``train.py:12 in step: fabric.barrier()``."""
    if place is None:
        return "<unknown place>"
    filename, line, function = place
    if filename.startswith(CELL_PREFIX):
        text = f"cell line {line}"
    else:
        text = f"{filename}:{line} in {function}"
    code = source_line(place) if with_source else ""
    return f"{text}: {code}" if code else text


def is_library_file(filename: str) -> bool:
    return filename.startswith(library_dirs()) or filename.startswith("<frozen ")


def rank_zero_guard(place: Optional[Place]) -> Optional[str]:
    """The enclosing ``if`` line of ``place`` when it tests for rank zero (``is_global_zero``,
    ``global_rank == 0``, ``local_rank == 0``, ``rank == 0``), else ``None``."""
    if place is None:
        return None
    filename, line, _ = place
    target = linecache.getline(filename, line)
    if not target.strip():
        return None
    indent = len(target) - len(target.lstrip())
    for number in range(line - 1, max(0, line - 60), -1):
        text = linecache.getline(filename, number)
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        own = len(text) - len(text.lstrip())
        if own >= indent:
            continue
        indent = own
        stripped = text.strip()
        if stripped.startswith(("if ", "elif ")) and _tests_rank_zero(stripped):
            return stripped
        if stripped.startswith(("def ", "class ")) or own == 0:
            return None
    return None


def _tests_rank_zero(condition: str) -> bool:
    compact = condition.replace(" ", "")
    return "is_global_zero" in compact or any(
        f"{name}==0" in compact or f"0=={name}" in compact
        for name in ("global_rank", "local_rank", "rank", "get_rank()", "node_rank")
    )
