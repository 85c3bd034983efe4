"""Output path: lines per second from 2 ranks to the notebook process through ``launch(fn)``.

Each rank prints ``--lines`` lines (half of the total); a counting sink in this process checks
that every line arrived, in order, per rank (nothing lost), and the time from the call to the
returned value is reported, with the per-rank log files on (the default: a temporary folder) and
off (``log_dir=False``), interleaved round by round. With the log files on, each file is checked
to hold every line too.

    python benchmarks/output_throughput.py [--lines 400000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from notebook_fabric import launch
from notebook_fabric.live.events import Output


class CountingSink:
    """Counts complete stdout lines per rank and checks they come in order (``line <i>``)."""

    def __init__(self) -> None:
        self.lines: Dict[int, int] = {}
        self._partial: Dict[int, str] = {}
        self.disorder = 0

    def handle(self, event) -> None:  # noqa: ANN001 - any event
        if not isinstance(event, Output) or event.stream != "stdout":
            return
        text = self._partial.pop(event.rank, "") + event.text
        *complete, rest = text.split("\n")
        if rest:
            self._partial[event.rank] = rest
        count = self.lines.get(event.rank, 0)
        for line in complete:
            if line != f"line {count}":
                self.disorder += 1
            count += 1
        self.lines[event.rank] = count

    def flush(self) -> None:
        pass


def chatty(fabric, lines: int) -> int:  # noqa: ANN001 - the rank's Fabric
    for i in range(lines):
        print(f"line {i}")  # what a training loop does (the rank's stdout is line-buffered)
    sys.stdout.flush()
    return lines


def one_run(lines_per_rank: int, log_dir) -> float:  # noqa: ANN001 - a path or False
    sink = CountingSink()
    started = time.perf_counter()
    launch(chatty, lines_per_rank, accelerator="cpu", devices=2, sink=sink, stall=None, log_dir=log_dir)
    elapsed = time.perf_counter() - started
    assert sink.lines == {0: lines_per_rank, 1: lines_per_rank} and sink.disorder == 0, (sink.lines, sink.disorder)
    if log_dir:
        for rank in range(2):
            with open(Path(log_dir) / f"rank{rank}" / "stdout.log", "rb") as handle:
                assert sum(1 for _ in handle) == lines_per_rank, f"rank {rank}'s log file lost lines"
    return elapsed


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=400_000, help="lines in all (half per rank)")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args(argv)
    per_rank = options.lines // 2
    times: Dict[str, List[float]] = {"log files on": [], "log files off": []}
    one_run(1000, False)  # warm-up
    for round_index in range(options.rounds):
        with tempfile.TemporaryDirectory() as folder:
            times["log files on"].append(one_run(per_rank, Path(folder) / f"logs{round_index}"))
        times["log files off"].append(one_run(per_rank, False))
        print(f"round {round_index + 1}/{options.rounds} done", file=sys.stderr, flush=True)
    print(f"\n{options.lines:,} lines from 2 ranks to this process through launch(fn), nothing lost "
          f"(median of {options.rounds})\n")
    print(f"{'variant':<16} {'median s':>9} {'min s':>7} {'lines/s':>12}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<16} {median:>9.2f} {min(samples):>7.2f} {options.lines / median:>12,.0f}")


if __name__ == "__main__":
    main()
