"""In the notebook: ``%fabric debug [--rank R]``, pdb on the frame where the last failing cell failed.

Like IPython's ``%debug``, but on a rank: the rank kept its exception (``sys.last_traceback``), so
the frame's locals are still there. The session runs as a task on that rank through the pool's
run loop, whose prompt server asks through the kernel's stdin (``(Pdb rank 1)``); the pool stays
as it was. :class:`DebugCommands` is mixed into :class:`~.session.FabricSession`, which calls
:meth:`DebugCommands.remember_failed_ranks` when a cell fails.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from notebook_fabric.live.ranks import format_ranks
from notebook_fabric.live.sinks import TextSink


class DebugCommands:
    """``%fabric debug`` (see the module docstring)."""

    pool: Any
    _debug_target: Optional[tuple] = None  # (the pool the cell failed on, its failing ranks in order)

    def _idle_pool(self, what: str) -> Any:  # pragma: no cover - provided by PoolCommands
        raise NotImplementedError

    def remember_failed_ranks(self, ranks: Sequence[int]) -> None:
        """The ranks that failed in the last failing cell (first to fail first), not merely interrupted."""
        self._debug_target = (self.pool, list(ranks))

    def debug(self, rank: Optional[int] = None) -> str:
        """Open pdb on ``rank``'s last failure (default: the first rank that failed in the last failing cell)."""
        from .commands import FabricUsageError

        pool = self._idle_pool("%fabric debug")
        failed: List[int] = []
        if self._debug_target is not None and self._debug_target[0] is pool:
            failed = self._debug_target[1]
        if rank is None:
            if not failed:
                raise FabricUsageError("%fabric debug: no %%fabric cell has failed on this pool; "
                                       "use --rank R to debug a rank's last exception")
            rank = failed[0]
        if not 0 <= rank < pool.world_size:
            raise FabricUsageError(f"%fabric debug: --rank must be one of 0..{pool.world_size - 1}, got {rank}")
        from notebook_fabric.stepping.post_mortem import PostMortemTask

        note = pool.run(PostMortemTask(), [rank], sink=TextSink(ranks=[rank]))[rank]
        if note:
            return note
        others = [r for r in failed if r != rank]
        also = f" ({format_ranks(others)} failed too: --rank R)" if others else ""
        return f"left the debugger on rank {rank}{also}"
