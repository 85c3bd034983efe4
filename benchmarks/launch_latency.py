"""Launch latency: from the call to the returned value, a trivial function on 2 CPU ranks.

Every variant starts 2 processes, joins a gloo process group in each, returns a value from rank 0
and ends the processes before the call returns:

- floor: raw ``multiprocessing`` (fork / spawn / forkserver) + ``init_process_group`` + a queue;
- notebook-fabric ``launch(fn)`` with each start method;
- Lightning Fabric ``Fabric(strategy="ddp_notebook" | "ddp_spawn").launch(fn)``;
- Accelerate ``notebook_launcher(fn, num_processes=2)`` (fork, through torch's elastic agent).

Lightning and Accelerate are not dependencies: install them to compare
(``pip install lightning-fabric accelerate``); missing ones are skipped with that hint.
Variants are interleaved round by round so load drift on a shared machine hits all alike;
medians are reported with ratios to the floor of the same start method.

    python benchmarks/launch_latency.py [--rounds 7] [--only fork]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

FLOOR = "floor: raw multiprocessing + init_process_group"


# -- the trivial work, per framework ------------------------------------------------------------
def raw_rank(rank: int, port: int, results) -> None:  # noqa: ANN001 - a multiprocessing queue
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:
        results.put(rank + 42)
    dist.destroy_process_group()


def fabric_work(fabric) -> int:  # noqa: ANN001 - notebook-fabric or Lightning Fabric
    return fabric.global_rank + 42


def accelerate_work() -> None:
    from accelerate import PartialState

    PartialState(cpu=True)  # joins the gloo process group, as Accelerator() would


# -- one measured call per variant --------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def floor(method: str) -> Callable[[], object]:
    context = multiprocessing.get_context(method)

    def call() -> object:
        port = free_port()
        results = context.SimpleQueue()
        ranks = [context.Process(target=raw_rank, args=(r, port, results)) for r in range(2)]
        for process in ranks:
            process.start()
        value = results.get()
        for process in ranks:
            process.join()
        results.close()
        return value

    return call


def notebook_fabric(method: str) -> Callable[[], object]:
    from notebook_fabric import launch
    from notebook_fabric.live.sinks import NullSink

    return lambda: launch(fabric_work, accelerator="cpu", devices=2, start_method=method, sink=NullSink())


def lightning(strategy: str) -> Optional[Callable[[], object]]:
    try:
        from lightning_fabric import Fabric
    except ImportError:
        return None
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    return lambda: Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(fabric_work)


def accelerate() -> Optional[Callable[[], object]]:
    try:
        from accelerate import notebook_launcher
    except ImportError:
        return None
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)

    def call() -> object:
        return notebook_launcher(accelerate_work, num_processes=2, use_port=str(free_port()))

    return call


# -- running ------------------------------------------------------------------------------------
def variants(only: Optional[str]) -> Dict[str, Dict[str, Optional[Callable[[], object]]]]:
    table: Dict[str, Dict[str, Optional[Callable[[], object]]]] = {
        "fork": {
            FLOOR: floor("fork"),
            "notebook-fabric launch()": notebook_fabric("fork"),
            "Lightning Fabric ddp_notebook": lightning("ddp_notebook"),
            "Accelerate notebook_launcher": accelerate(),
        },
        "spawn": {
            FLOOR: floor("spawn"),
            "notebook-fabric launch()": notebook_fabric("spawn"),
            "Lightning Fabric ddp_spawn": lightning("ddp_spawn"),
        },
        "forkserver": {
            FLOOR: floor("forkserver"),
            "notebook-fabric launch()": notebook_fabric("forkserver"),
        },
    }
    return {method: row for method, row in table.items() if only in (None, method)}


@contextlib.contextmanager
def silenced_descriptors() -> Iterator[None]:
    """Send fds 1 and 2 to /dev/null (the peers' spawned ranks print banners straight to them)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def quietly(call: Callable[[], object]) -> float:
    sink = io.StringIO()
    with silenced_descriptors(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        call()
        return time.perf_counter() - started


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (one warm-up round is not counted)")
    parser.add_argument("--only", choices=["fork", "spawn", "forkserver"], help="one start method only")
    options = parser.parse_args(argv)
    from notebook_fabric.launch.starters import FORKSERVER_PRELOAD

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)  # the same server for all
    table = variants(options.only)
    missing = sorted({name for row in table.values() for name, call in row.items() if call is None})
    times: Dict[str, Dict[str, List[float]]] = {m: {n: [] for n, c in row.items() if c} for m, row in table.items()}
    for round_index in range(options.rounds + 1):
        for method, row in table.items():
            for name, call in row.items():
                if call is None:
                    continue
                elapsed = quietly(call)
                if round_index > 0:
                    times[method][name].append(elapsed)
        print(f"round {round_index}/{options.rounds} done", file=sys.stderr, flush=True)

    print(f"\nlaunch latency, call -> value, trivial function on 2 CPU ranks "
          f"(torch {torch.__version__}, {os.cpu_count()} cores, median of {options.rounds})\n")
    print(f"{'start method':<12} {'variant':<50} {'median s':>9} {'min s':>7} {'x floor':>8}")
    for method, row in times.items():
        base = statistics.median(row[FLOOR])
        for name, samples in row.items():
            median = statistics.median(samples)
            print(f"{method:<12} {name:<50} {median:>9.3f} {min(samples):>7.3f} {median / base:>8.2f}")
    if missing:
        print(f"\nskipped (not installed): {', '.join(missing)} -> pip install lightning-fabric accelerate")


if __name__ == "__main__":
    main()
