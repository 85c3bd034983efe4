"""Per-rank log files: every rank's complete stdout and stderr, on disk, as torchrun's ``--log-dir``.

Layout: ``<log_dir>/rank<N>/stdout.log`` and ``stderr.log``, appended by the rank itself as its
output arrives (so they are complete even when the notebook's view is capped or the notebook is
gone). Without a ``log_dir`` the pool uses ``logs/`` in a temporary folder of its own, removes it
when every run succeeded and keeps it (and says where) after any failure; an explicit
``log_dir`` is always kept and its path printed when the pool stops.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

STREAMS = ("stdout", "stderr")


def rank_log_paths(log_dir: Optional[str], rank: int) -> Dict[str, str]:
    """``{"stdout": ".../rank3/stdout.log", "stderr": ...}``; empty without a ``log_dir``."""
    if log_dir is None:
        return {}
    folder = os.path.join(log_dir, f"rank{rank}")
    return {stream: os.path.join(folder, f"{stream}.log") for stream in STREAMS}


class RankLogs:
    """The log folder of one pool: chosen (or made) before the ranks start, kept or removed at the end.

    ``log_dir``: a path (kept), ``None`` (a temporary folder: removed unless :meth:`keep` was called)
    or ``False`` (no log files).
    """

    def __init__(self, log_dir: Union[str, "os.PathLike[str]", None, bool], num_processes: int) -> None:
        if log_dir is True or not (log_dir is None or log_dir is False or isinstance(log_dir, (str, os.PathLike))):
            raise TypeError(f"log_dir must be a path, None (a temporary folder) or False (no logs), got {log_dir!r}")
        self.explicit = log_dir not in (None, False)
        self._temporary: Optional[Path] = None
        self.path: Optional[Path] = None
        self.kept = self.explicit
        self._ranks = 0
        if log_dir is False:
            return
        if self.explicit:
            self.path = Path(log_dir).expanduser().resolve()
        else:
            self._temporary = Path(tempfile.mkdtemp(prefix="notebook-fabric-run-"))
            self.path = self._temporary / "logs"
        self._ranks = num_processes
        for rank in range(num_processes):
            (self.path / f"rank{rank}").mkdir(parents=True, exist_ok=True)

    @property
    def folder(self) -> Optional[str]:
        """What ranks get (``None``: no log files)."""
        return None if self.path is None else str(self.path)

    def keep(self) -> None:
        """A run failed: keep the folder even if it is a temporary one."""
        self.kept = self.path is not None

    def finish(self) -> Optional[str]:
        """Remove a temporary folder nobody needs; returns the kept folder's path (to print), if any."""
        if self.path is None:
            return None
        if self.kept:
            return str(self.path)
        if self._temporary is not None:
            _remove_layout(self._temporary, self.path, self._ranks)
        return None


def _remove_layout(temporary: Path, logs: Path, ranks: int) -> None:
    """Remove the temporary folder, file by known file (``rank<N>/stdout.log``, ``stderr.log``), and
    only if something else is in it walk it with ``shutil.rmtree`` (several times slower)."""
    try:
        for rank in range(ranks):
            folder = logs / f"rank{rank}"
            for stream in STREAMS:
                try:
                    os.unlink(folder / f"{stream}.log")
                except FileNotFoundError:
                    pass
            os.rmdir(folder)
        os.rmdir(logs)
        os.rmdir(temporary)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
