"""Launch latency: from the call to the returned value, a trivial function on N CPU ranks.

Every variant starts N processes (``--ranks 2 4 8``: each count is measured against its own floor), joins a gloo process group in each, returns a value from rank 0
and ends the processes before the call returns:

- floor: raw ``multiprocessing`` (fork / spawn / forkserver) + ``init_process_group`` + a queue;
- notebook-fabric ``launch(fn)`` with each start method;
- Lightning Fabric ``Fabric(strategy="ddp_notebook" | "ddp_spawn").launch(fn)``;
- Accelerate ``notebook_launcher(fn, num_processes=2)`` (fork, through torch's elastic agent).

Lightning and Accelerate are not dependencies: install them to compare
(``pip install lightning-fabric accelerate``); missing ones are skipped with that hint.
Variants are interleaved round by round so load drift on a shared machine hits all alike;
medians are reported with ratios to the floor of the same start method, with each call's CPU
(this process plus the ranks it reaped: ``RUSAGE_CHILDREN``; forkserver ranks are the fork
server's children and do not show) and each variant's per-round ratio to the floor ("paired").

    python benchmarks/launch_latency.py [--rounds 7] [--only fork] [--ranks 2 4 8] [--call-timeout 120]

A variant whose call raises or times out (Lightning at 4 ranks once failed in gloo's connectFullMesh) is
reported with its reason and the run goes on; whatever it left running is killed before the next call.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
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

import resource
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist

FLOOR = "floor: raw multiprocessing + init_process_group"


# -- the trivial work, per framework ------------------------------------------------------------
def raw_rank(rank: int, port: int, results, world_size: int = 2) -> None:  # noqa: ANN001 - a multiprocessing queue
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
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


def floor(method: str, world_size: int = 2) -> Callable[[], object]:
    context = multiprocessing.get_context(method)

    def call() -> object:
        port = free_port()
        results = context.SimpleQueue()
        ranks = [context.Process(target=raw_rank, args=(r, port, results, world_size)) for r in range(world_size)]
        for process in ranks:
            process.start()
        value = results.get()
        for process in ranks:
            process.join()
        results.close()
        return value

    return call


def notebook_fabric(method: str, world_size: int = 2) -> Callable[[], object]:
    from notebook_fabric import launch
    from notebook_fabric.live.sinks import NullSink

    return lambda: launch(fabric_work, accelerator="cpu", devices=world_size, start_method=method, sink=NullSink())


def lightning(strategy: str, world_size: int = 2) -> Optional[Callable[[], object]]:
    try:
        from lightning_fabric import Fabric
    except ImportError:
        return None
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    return lambda: Fabric(accelerator="cpu", devices=world_size, strategy=strategy).launch(fabric_work)


def accelerate(world_size: int = 2) -> Optional[Callable[[], object]]:
    try:
        from accelerate import notebook_launcher
    except ImportError:
        return None
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)

    def call() -> object:
        return notebook_launcher(accelerate_work, num_processes=world_size, use_port=str(free_port()))

    return call


# -- running ------------------------------------------------------------------------------------
def variants(only: Optional[str], world_size: int = 2) -> Dict[str, Dict[str, Optional[Callable[[], object]]]]:
    n = world_size
    table: Dict[str, Dict[str, Optional[Callable[[], object]]]] = {
        "fork": {
            FLOOR: floor("fork", n),
            "notebook-fabric launch()": notebook_fabric("fork", n),
            "Lightning Fabric ddp_notebook": lightning("ddp_notebook", n),
            "Accelerate notebook_launcher": accelerate(n),
        },
        "spawn": {
            FLOOR: floor("spawn", n),
            "notebook-fabric launch()": notebook_fabric("spawn", n),
            "Lightning Fabric ddp_spawn": lightning("ddp_spawn", n),
        },
        "forkserver": {
            FLOOR: floor("forkserver", n),
            "notebook-fabric launch()": notebook_fabric("forkserver", n),
        },
    }
    return {f"{method} x{n}": row for method, row in table.items() if only in (None, method)}


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


class CallTimedOut(Exception):
    """One measured call took longer than ``--call-timeout`` seconds."""


def _raise_timeout(signum, frame) -> None:  # noqa: ANN001 - a signal handler
    raise CallTimedOut()


def _shared_helpers() -> set:
    """multiprocessing's forkserver and resource tracker: every later call of this run needs them."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {pid for pid in pids if pid is not None}


def reap_children() -> None:
    """End whatever a failed variant left running (its ranks, its elastic agent), so later rounds start clean."""
    keep = _shared_helpers()
    children = [c for c in psutil.Process().children(recursive=False) if c.pid not in keep]
    children += [g for c in children for g in _descendants(c)]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def _descendants(process: "psutil.Process") -> list:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


@dataclass
class Sample:
    """One measured call: wall seconds, CPU seconds of this process and of the ranks it reaped."""

    wall: float
    parent_cpu: float
    ranks_cpu: float
    round: int = 0

    @property
    def cpu(self) -> float:
        return self.parent_cpu + self.ranks_cpu


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def quietly(call: Callable[[], object], call_timeout: float) -> Sample:
    """What one call took (wall and CPU); raises what the call raised (``CallTimedOut`` past ``call_timeout``).

    The ranks' CPU is ``RUSAGE_CHILDREN``: every variant waits for its ranks (or its agent, which
    waits for its ranks) before returning, so their whole CPU time is counted in the call."""
    sink = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        with silenced_descriptors(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parent_before, ranks_before = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, call_timeout)
            try:
                call()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            wall = time.perf_counter() - started
            return Sample(wall, _cpu_seconds(resource.RUSAGE_SELF) - parent_before,
                          _cpu_seconds(resource.RUSAGE_CHILDREN) - ranks_before)
    finally:
        signal.signal(signal.SIGALRM, previous)


def describe_failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1][:120] if text else ''}".rstrip(": ")


def print_paired(method: str, row: Dict[str, List[Sample]]) -> None:
    """Each variant's wall time over the floor's *of the same round* (the median of those ratios and
    their quartiles): drift between rounds cancels out, and a round a failed call is missing from is skipped."""
    floor_by_round = {s.round: s for s in row[FLOOR]}
    for name, samples in row.items():
        ratios = sorted(s.wall / floor_by_round[s.round].wall for s in samples if s.round in floor_by_round)
        if name == FLOOR or not ratios:
            continue
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        print(f"{'':<15}   {name} / floor, paired by round: {statistics.median(ratios):.2f} "
              f"[{quartiles[0]:.2f}-{quartiles[2]:.2f}]")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (one warm-up round is not counted)")
    parser.add_argument("--only", choices=["fork", "spawn", "forkserver"], help="one start method only")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], metavar="N",
                        help="rank counts to measure, each against the floor at the same count (default 2 4 8)")
    parser.add_argument("--call-timeout", type=float, default=120.0,
                        help="seconds one call may take before it counts as failed (default 120)")
    options = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    from notebook_fabric.launching.starters import FORKSERVER_PRELOAD

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)  # the same server for all
    table = {key: row for n in options.ranks for key, row in variants(options.only, n).items()}
    missing = sorted({name for row in table.values() for name, call in row.items() if call is None})
    times: Dict[str, Dict[str, List[Sample]]] = {m: {n: [] for n, c in row.items() if c} for m, row in table.items()}
    failures: Dict[str, Dict[str, List[str]]] = {m: {n: [] for n in row} for m, row in table.items()}
    for round_index in range(options.rounds + 1):
        for method, row in table.items():
            for name, call in row.items():
                if call is None:
                    continue
                try:
                    sample = quietly(call, options.call_timeout)
                except Exception as error:  # a peer that fails is reported, and the run goes on
                    failures[method][name].append(describe_failure(error))
                    print(f"{method} {name}: failed ({describe_failure(error)})", file=sys.stderr, flush=True)
                    reap_children()
                    continue
                if round_index > 0:
                    sample.round = round_index
                    times[method][name].append(sample)
        print(f"round {round_index}/{options.rounds} done", file=sys.stderr, flush=True)

    print(f"\nlaunch latency, call -> value, trivial function on {', '.join(map(str, options.ranks))} CPU ranks "
          f"(torch {torch.__version__}, {os.cpu_count()} cores, median of {options.rounds}; load average before "
          f"{load_before:.2f}, after {os.getloadavg()[0]:.2f})\n")
    print(f"{'method x ranks':<15} {'variant':<50} {'median s':>9} {'min s':>7} {'x floor':>8} "
          f"{'CPU ms':>7} {'parent':>7} {'x floor':>8} {'failed':>7}")
    for method, row in times.items():
        base = statistics.median(s.wall for s in row[FLOOR]) if row[FLOOR] else float("nan")
        base_cpu = statistics.median(s.cpu for s in row[FLOOR]) if row[FLOOR] else float("nan")
        for name, samples in row.items():
            failed = f"{len(failures[method][name])}/{options.rounds + 1}" if failures[method][name] else ""
            if not samples:
                print(f"{method:<15} {name:<50} {'-':>9} {'-':>7} {'-':>8} {'-':>7} {'-':>7} {'-':>8} {failed:>7}")
                continue
            median = statistics.median(s.wall for s in samples)
            cpu = statistics.median(s.cpu for s in samples)
            parent = statistics.median(s.parent_cpu for s in samples)
            print(f"{method:<15} {name:<50} {median:>9.3f} {min(s.wall for s in samples):>7.3f} {median / base:>8.2f} "
                  f"{1000 * cpu:>7.1f} {1000 * parent:>7.1f} {cpu / base_cpu:>8.2f} {failed:>7}")
        print_paired(method, row)
    for method, row in failures.items():
        for name, reasons in row.items():
            for reason in sorted(set(reasons)):
                print(f"failed: {method} {name}: {reason} ({reasons.count(reason)}x)")
    if missing:
        print(f"\nskipped (not installed): {', '.join(missing)} -> pip install lightning-fabric accelerate")


if __name__ == "__main__":
    main()
