"""What the collective ledger and debug mode cost, against raw torch.distributed, in one run.

Two CPU ranks started by ``notebook_fabric.launch`` (so the ranks carry the real tracer chain:
the ledger, whose open call is also what heartbeats report, and debug mode when switched on).
Per round, interleaved (and rotated) so that drift on a shared machine hits every variant alike:

- 10,000 ``all_reduce`` of 4 floats: raw ``dist.all_reduce``; raw after a busy pause of
  ``BENCH_GAP_US`` (25) microseconds, about Fabric's own work per call (the reference for how
  gloo's latency reacts to any pause between calls); ``fabric.all_reduce`` with no tracer, with
  the ledger (the launcher's chain), and with debug mode on top. Reported: wall time per call, the
  median and quartiles of the rounds' paired ratios to raw, and the calling thread's CPU per call
  (waiting costs no CPU, so this is the number the machine's load moves least);
- a DDP training step with the Flight Recorder on vs off: pairs of fresh 2-rank process groups
  (the recorder must be chosen before the group exists), the "on" and "off" run of a pair side by
  side at the same time so they share the load; wall and CPU per step, median and quartiles of the
  paired ratios.

    .venv/bin/python benchmarks/collective_ledger.py     # BENCH_CALLS, BENCH_ROUNDS, BENCH_DDP_PAIRS, BENCH_SKIP_DDP
    BENCH_HOGS=1 .venv/bin/python benchmarks/collective_ledger.py   # the same beside 1 busy-looping process

Measured numbers and what they mean: ``benchmarks/README.md``.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

CALLS = int(os.environ.get("BENCH_CALLS", 10_000))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 20))
DDP_STEPS = int(os.environ.get("BENCH_DDP_STEPS", 200))
GAP_US = int(os.environ.get("BENCH_GAP_US", 25))
DDP_PAIRS = int(os.environ.get("BENCH_DDP_PAIRS", 8))
HOGS = int(os.environ.get("BENCH_HOGS", 0))  # busy-looping processes beside the ranks: a shared machine, on purpose


def _spread(values: List[float]) -> str:
    """``median [p25-p75]`` of ``values``."""
    ordered = sorted(values)
    if len(ordered) < 4:
        return f"{statistics.median(ordered):.3f}"
    quartiles = statistics.quantiles(ordered, n=4)
    return f"{statistics.median(ordered):.3f} [{quartiles[0]:.3f}-{quartiles[2]:.3f}]"


_CPU: Dict[str, List[float]] = {}  # the calling thread's CPU seconds per round, per variant


def _timed(fn: Callable[[], None], calls: int, name: str = "") -> float:
    """Wall seconds of ``calls`` calls (after a barrier); the calling thread's CPU goes to ``_CPU[name]``."""
    import torch.distributed as dist

    dist.barrier()
    cpu = time.thread_time()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    wall = time.perf_counter() - start
    _CPU.setdefault(name, []).append(time.thread_time() - cpu)
    return wall


def _all_reduce_rounds(fabric) -> Dict[str, List[float]]:
    """Seconds per round of ``CALLS // ROUNDS`` calls, per variant; rounds interleave the variants."""
    import torch.distributed as dist

    from notebook_fabric.collectives.debug import enable_signature_checks
    from notebook_fabric.collectives.trace import get_tracer, set_tracer

    chain = get_tracer()  # the launcher's: the ledger (the event link joins it only for the dashboard)
    data = torch.ones(4)
    results: Dict[str, List[float]] = {"raw": [], f"raw + {GAP_US} us spin": [], "fabric, no tracer": [],
                                       "fabric + ledger": [], "fabric + debug": []}
    set_tracer(None)
    checker = enable_signature_checks()  # builds its group once (every rank, same point)
    set_tracer(chain)
    raw = lambda: dist.all_reduce(data)  # noqa: E731
    through = lambda: fabric.all_reduce(data, reduce_op="sum")  # noqa: E731
    per_round = max(1, CALLS // ROUNDS)
    def spin_then_raw() -> None:  # the reference: raw, after a busy pause as long as Fabric's own work
        end = time.perf_counter() + GAP_US / 1e6
        while time.perf_counter() < end:
            pass
        dist.all_reduce(data)

    variants = [("raw", None, raw), (f"raw + {GAP_US} us spin", None, spin_then_raw),
                ("fabric, no tracer", None, through), ("fabric + ledger", chain, through),
                ("fabric + debug", checker, through)]
    for index in range(ROUNDS):
        shift = index % len(variants)  # rotate the order too: no variant always runs first or last
        for name, tracer, fn in variants[shift:] + variants[:shift]:
            set_tracer(tracer)
            results[name].append(_timed(fn, per_round, name))
    set_tracer(chain)
    for name in list(results):
        results[f"cpu:{name}"] = _CPU[name]
    meta = {"group": None, "group_size": 2, "shapes": [(4,)], "dtypes": ["torch.float32"], "reduce_op": "sum"}
    start = time.process_time()
    for _ in range(CALLS):  # the chain's bookkeeping alone (CPU time), without the collective
        chain.exit(chain.enter("all_reduce", dict(meta)), None)
    results["bookkeeping"] = [time.process_time() - start]
    return results


def _ddp_pair(index: int) -> Dict[bool, List[float]]:
    """One fresh 2-rank DDP run with the Flight Recorder off and one with it on, *at the same time*
    (two process groups, four processes), so both see the same load; per run ``[wall s, CPU s]``
    per step (rank 0: best of 10 blocks of steps; CPU of the whole process, gloo's threads too)."""
    children = {}
    for recorder in ((False, True) if index % 2 == 0 else (True, False)):  # who starts first alternates
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_DDP_CHILD": "1", "BENCH_FR": "1" if recorder else "0",
               "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2",
               "MASTER_PORT": str(29600 + 2 * ((os.getpid() + index) % 400) + int(recorder))}
        env.pop("TORCH_FR_BUFFER_SIZE", None)
        children[recorder] = [subprocess.Popen([sys.executable, __file__], env={**env, "RANK": str(r)},
                                               stdout=subprocess.PIPE, text=True) for r in range(2)]
    result = {}
    for recorder, ranks in sorted(children.items()):
        outputs = [c.communicate(timeout=600)[0] for c in ranks]
        result[recorder] = [float(x) for x in outputs[0].strip().splitlines()[-1].split()]
    return result


def _ddp_child() -> None:
    if os.environ["BENCH_FR"] == "1":
        os.environ["TORCH_FR_BUFFER_SIZE"] = "2000"
    import torch.distributed as dist
    import torch.nn as nn

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, targets = torch.randn(64, 256), torch.randint(0, 10, (64,))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    for _ in range(10):
        step()
    blocks = DDP_STEPS // 10
    walls, cpus = [], []
    for _ in range(10):
        cpu = time.process_time()
        walls.append(_timed(step, blocks) / blocks)
        cpus.append((time.process_time() - cpu) / blocks)
    if dist.get_rank() == 0:
        print(min(walls), statistics.median(cpus), flush=True)
    dist.destroy_process_group()


def main() -> None:
    from notebook_fabric import launch

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(HOGS)]
    try:
        rounds = launch(_all_reduce_rounds, devices=2, accelerator="cpu", stall=None)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if HOGS:
        print(f"(beside {HOGS} busy-looping process{'es' if HOGS > 1 else ''} on {os.cpu_count()} cores)")
    print(f"{CALLS} x all_reduce(4 floats) per variant on 2 CPU ranks, in {ROUNDS} interleaved rounds "
          "(ratios to raw: median [quartiles] of the rounds' paired ratios; whole run):")
    bookkeeping = rounds.pop("bookkeeping")[0]
    cpu = {name[4:]: rounds.pop(name) for name in list(rounds) if name.startswith("cpu:")}
    for name, times in rounds.items():
        ratios = [t / r for t, r in zip(times, rounds["raw"])]
        print(f"  {name:<20} {statistics.median(times) * 1e6 / max(1, CALLS // ROUNDS):8.1f} us/call (median round)"
              f"   {_spread(ratios)}x raw   whole run {sum(times) / sum(rounds['raw']):5.2f}x")
    per_round = max(1, CALLS // ROUNDS)
    raw_cpu = statistics.median(cpu["raw"]) / per_round
    print("  CPU of the calling thread per call (median round; waiting costs none, so load hardly moves it):")
    for name, values in cpu.items():
        extra = statistics.median(values) / per_round - raw_cpu
        print(f"    {name:<20} {statistics.median(values) / per_round * 1e6:7.1f} us   (+{extra * 1e6:.1f} us over raw)")
    print(f"  the ledger's bookkeeping alone: {bookkeeping * 1e6 / CALLS:.2f} us CPU per call "
          f"({bookkeeping * 1e6 / CALLS / (statistics.median(rounds['raw']) * 1e6 / max(1, CALLS // ROUNDS)) * 100:.1f}% "
          "of a raw all_reduce, median round)")
    if os.environ.get("BENCH_SKIP_DDP") == "1":
        return
    runs = [_ddp_pair(index) for index in range(DDP_PAIRS)]
    for what, at in (("wall", 0), ("CPU", 1)):
        off = [run[False][at] for run in runs]
        on = [run[True][at] for run in runs]
        print(f"DDP step (256-512-10 MLP, batch 64), 2 ranks, {what} per step, {DDP_PAIRS} pairs of fresh runs with the "
              f"Flight Recorder off and on side by side: off {statistics.median(off) * 1e3:.2f} ms, on "
              f"{statistics.median(on) * 1e3:.2f} ms (medians); paired ratio on/off "
              f"{_spread([b / a for a, b in zip(off, on)])}x")

if __name__ == "__main__":
    if os.environ.get("BENCH_DDP_CHILD") == "1":
        _ddp_child()
    else:
        main()
