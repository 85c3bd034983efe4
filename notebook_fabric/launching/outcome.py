"""What one task on a pool came to, per rank: :class:`RunOutcome`.

``RankPool.run_task`` returns it instead of raising, so ``launch(fn)`` and the ``%%fabric`` magic
render the same record: the values of the ranks that answered, every rank's failure (not only the
first group), who was interrupted, who died and how, and the exception ``RankPool.run`` raises for
it (``error``), if any.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..live.events import RemoteFailure


@dataclass
class RunOutcome:
    """See the module docstring. ``ranks``: the ranks the task ran on, in order."""

    ranks: List[int]
    values: Dict[int, Any] = field(default_factory=dict)
    failures: Dict[int, RemoteFailure] = field(default_factory=dict)
    arrival: List[int] = field(default_factory=list)  # failing ranks in the order their failures came
    interrupted: List[int] = field(default_factory=list)
    unfinished: List[int] = field(default_factory=list)  # ranks that never answered (stopped with the pool)
    deaths: Dict[int, str] = field(default_factory=dict)  # rank -> "killed by signal SIGKILL (...)"
    ledgers: Dict[int, tuple] = field(default_factory=dict)  # each rank's newest collective ledger entries
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def finished(self) -> List[int]:
        return sorted(self.values)

    @property
    def death_summary(self) -> str:
        """``"rank 1 was killed by signal SIGKILL (...); rank 2 exited with code 3"``, or ``""``."""
        return "; ".join(f"rank {rank} {text}" for rank, text in sorted(self.deaths.items()))

    def result(self) -> Dict[int, Any]:
        """``{rank: value}``, or raise what went wrong (what ``RankPool.run`` does)."""
        if self.error is not None:
            raise self.error
        return {rank: self.values[rank] for rank in self.ranks}
