"""The live dashboard's cost to a training loop: a small DDP loop on 2 ranks, dashboard on vs off.

One real kernel (jupyter_client, this interpreter) runs ``launch(train, devices=2,
dashboard=True|False)``, the variants interleaved round by round so that drift on a shared
machine hits both alike. ``train`` is a small DDP loop (an MLP on random data, ``fabric.backward``
so gradients are all-reduced) that draws a tqdm bar, calls ``fabric.log`` every step and prints
every 20 steps: the things the dashboard shows. Each rank times its own loop (``perf_counter``
around it, so pool start-up is not counted) and rank 0's time is reported.

The kernel's own CPU time per run is reported too (on a 2-core machine with 2 busy ranks, every
CPU second the kernel spends is taken from a rank). The client also counts what the front end would receive while each dashboard run's cell is busy:
``comm_msg`` messages (widget updates) per second of the cell.

    .venv/bin/python benchmarks/dashboard_overhead.py [--rounds 7] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from typing import Dict, List, Tuple

import psutil
from jupyter_client.manager import KernelManager

SETUP = """
import time, json
import torch
from tqdm.auto import tqdm
from notebook_fabric import launch

def train(fabric, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.randn(128, 64), torch.randn(128, 1)
    started = time.perf_counter()
    for step in tqdm(range(steps), desc="train"):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        fabric.log("loss", loss.item(), step=step)
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    fabric.barrier("end")
    return time.perf_counter() - started
"""


def run_cell(client, code: str, timeout: float = 300) -> Tuple[str, Dict[str, int], float]:
    """Execute ``code``; its ``text/plain`` result, counts of iopub message types, busy seconds."""
    msg_id = client.execute(code)
    counts: Dict[str, int] = {}
    result, error = "", None
    busy_at = idle_at = None
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(code)
        kind = msg["msg_type"]
        if kind.startswith("comm_"):  # widget messages: the parent may be a thread's, count them all
            counts[kind] = counts.get(kind, 0) + 1
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        counts[kind] = counts.get(kind, 0) + (0 if kind.startswith("comm_") else 1)
        if kind == "status" and msg["content"]["execution_state"] == "busy":
            busy_at = time.monotonic()
        elif kind == "execute_result":
            result = msg["content"]["data"]["text/plain"]
        elif kind == "error":
            error = "\n".join(msg["content"]["traceback"])
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle_at = time.monotonic()
            break
    if error:
        raise RuntimeError(error)
    return result, counts, (idle_at or time.monotonic()) - (busy_at or idle_at or 0)


def _cpu(process: psutil.Process) -> float:
    """CPU seconds of the kernel's own threads (its ranks are children, not counted)."""
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    km.start_kernel(env={**os.environ, "OMP_NUM_THREADS": "1"})
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    times: Dict[str, List[float]] = {"off": [], "on": []}
    kernel_cpu: Dict[str, List[float]] = {"off": [], "on": []}
    kernel = psutil.Process(km.provisioner.pid)
    rates: List[float] = []
    try:
        run_cell(client, SETUP)
        run_cell(client, "launch(train, 20, devices=2, accelerator='cpu', dashboard=False)")  # warm caches
        for round_index in range(args.rounds):
            order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
            for variant in order:
                code = f"launch(train, {args.steps}, devices=2, accelerator='cpu', dashboard={variant == 'on'})"
                cpu_before = _cpu(kernel)
                result, counts, busy = run_cell(client, code)
                kernel_cpu[variant].append(_cpu(kernel) - cpu_before)
                times[variant].append(float(result))
                if variant == "on":
                    rates.append(counts.get("comm_msg", 0) / busy)
            print(f"round {round_index + 1}: off {times['off'][-1]:.3f} s, on {times['on'][-1]:.3f} s, "
                  f"front end {rates[-1]:.1f} widget updates/s; kernel CPU off {kernel_cpu['off'][-1]:.2f} s, "
                  f"on {kernel_cpu['on'][-1]:.2f} s", flush=True)
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    ratios = [b / a for a, b in zip(times["off"], times["on"])]
    summary = {"steps": args.steps, "rounds": args.rounds, "median_off_s": round(off, 4), "median_on_s": round(on, 4),
               "ratio_of_medians": round(on / off, 4), "median_paired_ratio": round(statistics.median(ratios), 4),
               "front_end_updates_per_s_median": round(statistics.median(rates), 2),
               "front_end_updates_per_s_max": round(max(rates), 2),
               "kernel_cpu_s_per_run_off": round(statistics.median(kernel_cpu["off"]), 3),
               "kernel_cpu_s_per_run_on": round(statistics.median(kernel_cpu["on"]), 3)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
