"""The checkpoint write path alone, one process: ``torch.save`` vs notebook-fabric's atomic save.

    .venv/bin/python benchmarks/checkpoint_write.py

Ours streams into a temporary file beside the target and renames it over the target (a crash
never leaves a torn checkpoint), with no in-memory copy of the whole checkpoint first. Interleaved
rounds, medians, ratios to ``torch.save`` in the same run.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn

from notebook_fabric.checkpoint import state as checkpoint_state
from notebook_fabric.checkpoint.io import atomic_save
from notebook_fabric.strategies import SingleDeviceStrategy

ROUNDS, CALLS = 15, 5


def per_call(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS


def main() -> None:
    torch.manual_seed(0)
    strategy = SingleDeviceStrategy()
    folder = tempfile.mkdtemp()
    print(f"{'checkpoint':>12} {'torch.save':>12} {'atomic_save':>12} {'ratio':>7}")
    for width in (512, 2048, 4096):
        model = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        raw_path, our_path = os.path.join(folder, "raw.pt"), os.path.join(folder, "ours.ckpt")
        variants = {
            "raw": lambda: torch.save({"model": model.state_dict()}, raw_path),
            "ours": lambda: atomic_save(checkpoint_state.to_saveable(strategy, {"model": model}), our_path),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, fn in variants.items():
                samples[name].append(per_call(fn))
        raw, ours = (statistics.median(samples[name]) for name in ("raw", "ours"))
        size = os.path.getsize(raw_path) / 1e6
        print(f"{size:>9.1f} MB {raw * 1e3:>9.2f} ms {ours * 1e3:>9.2f} ms {ours / raw:>6.2f}x")


if __name__ == "__main__":
    main()
