"""How a set of ranks is written in every message: ``format_ranks``."""
from __future__ import annotations

from typing import Iterable, List, Tuple


def format_ranks(ranks: Iterable[int]) -> str:
    """``[0]`` -> ``"rank 0"``; ``[1, 2, 3, 5]`` -> ``"ranks 1-3, 5"``."""
    ordered = sorted(set(ranks))
    if len(ordered) == 1:
        return f"rank {ordered[0]}"
    spans: List[Tuple[int, int]] = []
    for rank in ordered:
        if spans and rank == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], rank)
        else:
            spans.append((rank, rank))
    return "ranks " + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
