"""How a set of ranks is written in every message: ``format_ranks``, and ``format_ranks_on`` with their hosts."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple


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


def format_ranks_on(ranks: Iterable[int], hosts: Optional[Mapping[int, str]]) -> str:
    """:func:`format_ranks` with the hosts the ranks run on, where they run on other hosts (``hosts`` maps
    rank -> host; empty or ``None`` on one machine): ``"rank 1 on host nfnode2"``,
    ``"rank 0 on host nfnode1 and ranks 2-3 on host nfnode2"``."""
    ordered = sorted(set(ranks))
    if not hosts or not any(hosts.get(rank) for rank in ordered):
        return format_ranks(ordered)
    by_host: Dict[str, List[int]] = {}
    for rank in ordered:
        by_host.setdefault(hosts.get(rank) or "an unknown host", []).append(rank)
    parts = [f"{format_ranks(group)} on host {host}" for host, group in by_host.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
