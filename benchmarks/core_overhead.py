"""What notebook-fabric adds to the hot paths, against raw PyTorch and Lightning Fabric, in one run.

Run on 2 CPU ranks (all three share one process group, so they meet the same conditions):

    .bench-venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/core_overhead.py

``benchmarks/README.md`` says how to make ``.bench-venv`` (it has lightning-fabric installed;
the project itself never depends on it). Prints medians and ratios to raw PyTorch.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

REPEATS = int(os.environ.get("BENCH_REPEATS", 7))


def per_call_seconds(fn: Callable[[], None], iterations: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


ITERATIONS = {"ddp step": 30, "all_reduce(4 floats)": 300, "save (rank 0)": 5}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def step_function(model: nn.Module, optimizer: torch.optim.Optimizer, backward: Callable) -> Callable[[], None]:
    inputs, targets = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def step() -> None:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        backward(loss)
        optimizer.step()

    return step


def save_then_wait(state: dict, path: str) -> None:
    """What correct raw DDP code does: rank 0 writes, every rank waits until the file is complete."""
    if dist.get_rank() == 0:
        torch.save(state, path)
    dist.barrier()


def bench_raw() -> dict[str, Callable[[], None]]:
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    small = torch.ones(4)
    state = {"model": model.module.state_dict()}
    path = os.path.join(tempfile.gettempdir(), f"bench_raw_{dist.get_rank()}.pt")
    return {
        "ddp step": step_function(model, optimizer, lambda loss: loss.backward()),
        "all_reduce(4 floats)": lambda: dist.all_reduce(small.clone()),
        "save (rank 0)": lambda: save_then_wait(state, path),
    }


def bench_ours() -> dict[str, Callable[[], None]]:
    from notebook_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=dist.get_world_size(), strategy="ddp")
    fabric.launch()
    model, optimizer = fabric.setup(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.01))
    small = torch.ones(4)
    path = os.path.join(tempfile.gettempdir(), "bench_ours.ckpt")
    return {
        "ddp step": step_function(model, optimizer, fabric.backward),
        "all_reduce(4 floats)": lambda: fabric.all_reduce(small, reduce_op="sum"),
        "save (rank 0)": lambda: fabric.save(path, {"model": model}),
    }


def bench_lightning() -> dict[str, Callable[[], None]]:
    try:
        from lightning.fabric import Fabric as LightningFabric
    except ImportError:
        try:
            from lightning_fabric import Fabric as LightningFabric
        except ImportError:
            return {}
    fabric = LightningFabric(accelerator="cpu", devices=dist.get_world_size(), strategy="ddp")
    fabric.launch()
    model, optimizer = fabric.setup(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.01))
    small = torch.ones(4)
    path = os.path.join(tempfile.gettempdir(), "bench_lightning.ckpt")
    return {
        "ddp step": step_function(model, optimizer, fabric.backward),
        "all_reduce(4 floats)": lambda: fabric.all_reduce(small, reduce_op="sum"),
        "save (rank 0)": lambda: fabric.save(path, {"model": model}),
    }


def main() -> None:
    dist.init_process_group("gloo")
    variants = {"raw PyTorch": bench_raw(), "notebook-fabric": bench_ours(), "Lightning Fabric": bench_lightning()}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(REPEATS):  # interleaved rounds: load drift on a shared machine hits every variant alike
        for name, calls in variants.items():
            for metric, call in calls.items():
                call()  # warm-up
                samples[name].setdefault(metric, []).append(per_call_seconds(call, ITERATIONS[metric]))
    results = {name: {m: statistics.median(v) for m, v in per.items()} for name, per in samples.items()}
    if dist.get_rank() != 0:
        return
    raw = results["raw PyTorch"]
    print(f"{'':24}" + "".join(f"{name:>22}" for name in results))
    for metric in raw:
        cells = []
        for timings in results.values():
            if metric not in timings:
                cells.append(f"{'not installed':>22}")
                continue
            value = timings[metric]
            cells.append(f"{value * 1e6:>11.1f} us ({value / raw[metric]:4.2f}x)")
        print(f"{metric:24}" + "".join(cells))
    print("ratios are to raw PyTorch in the same run; medians of", REPEATS, "repeats")


if __name__ == "__main__":
    main()
