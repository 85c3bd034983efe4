"""Round trip of a trivial cell through a real kernel: plain vs warm ``%%fabric`` vs ``launch()`` vs ``%%px``.

One kernel (this interpreter, so run it with the bench venv, which has ipyparallel) hosts all four:

- ``plain``:     ``x = 1`` run by the kernel itself;
- ``%%fabric``:  the same line on a warm pool of 2 CPU ranks (``%load_ext notebook_fabric``);
- ``launch()``:  a one-shot ``launch(fn, devices=2)`` of a function doing the same (start, run, stop);
- ``%%px``:      ipyparallel's cell magic on 2 engines of a local cluster (started once, warm).

A round trip is what a notebook user waits for: from sending the execute request (jupyter_client)
to the kernel's ``idle`` status for it. Variants are interleaved round by round (the machine may
be shared, so drift hits every variant alike) and medians are reported with the difference to
the plain cell. Extra ``%%fabric`` variants show the cost of output and of a displayed value.

    .bench-venv/bin/python benchmarks/magic_roundtrip.py [--rounds 7] [--reps 30]
"""
from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import time
from typing import Dict, List

from jupyter_client.manager import KernelManager

SETUP = [
    "%load_ext notebook_fabric",
    "%%fabric --devices 2 --accelerator cpu\nx = 1",
    "from notebook_fabric import launch\n\ndef trivial(fabric):\n    x = 1\n",
    "import ipyparallel as ipp\n"
    "cluster = ipp.Cluster(n=2, log_level=40)\n"
    "rc = cluster.start_and_connect_sync()\n"
    "rc.wait_for_engines(2, timeout=120)\n"
    "rc[:].activate()",
    "%%px\nx = 1",
]
VARIANTS = {
    "plain cell": "x = 1",
    "%%fabric (warm, 2 ranks)": "%%fabric\nx = 1",
    "%%px (ipyparallel, 2 engines)": "%%px\nx = 1",
    "launch() one-shot (2 ranks)": "launch(trivial, devices=2, accelerator='cpu')",
    "%%fabric + print on rank 0": "%%fabric\nprint(x)",
    "%%fabric + value per rank": "%%fabric\nfabric.global_rank",
}
SLOW = {"launch() one-shot (2 ranks)"}


class Client:
    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def roundtrip(self, code: str, timeout: float = 300.0) -> float:
        """Seconds from sending ``code`` to the kernel's idle status for it; raises if it failed."""
        start = time.perf_counter()
        msg_id = self.kc.execute(code)
        error = None
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no answer to {code!r}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = "\n".join(msg["content"]["traceback"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                elapsed = time.perf_counter() - start
                break
        self.kc.get_shell_msg(timeout=timeout)  # the execute_reply, so the next request starts clean
        if error:
            raise RuntimeError(f"{code!r} failed:\n{error}")
        return elapsed

    def close(self) -> None:
        try:
            self.roundtrip("cluster.stop_cluster_sync()\n%fabric stop")
        finally:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=30, help="cells per variant per round (launch(): a fifth)")
    args = parser.parse_args()

    client = Client()
    try:
        for code in SETUP:
            client.roundtrip(code)
        samples: Dict[str, List[float]] = {name: [] for name in VARIANTS}
        for name, code in VARIANTS.items():  # warm every path once
            client.roundtrip(code)
        order = list(VARIANTS)
        for _ in range(args.rounds):
            random.shuffle(order)
            for name in order:
                reps = max(2, args.reps // 5) if name in SLOW else args.reps
                samples[name] += [client.roundtrip(VARIANTS[name]) for _ in range(reps)]
    finally:
        client.close()

    plain = statistics.median(samples["plain cell"]) * 1e3
    print(f"round trip of a trivial cell through a kernel (median of {args.rounds} interleaved rounds; python "
          f"{sys.version.split()[0]})")
    print(f"{'variant':34s} {'median ms':>10s} {'p10 ms':>8s} {'p90 ms':>8s} {'vs plain':>10s}  n")
    for name, values in samples.items():
        ms = sorted(v * 1e3 for v in values)
        median = statistics.median(ms)
        p10, p90 = ms[len(ms) // 10], ms[(len(ms) * 9) // 10]
        print(f"{name:34s} {median:10.2f} {p10:8.2f} {p90:8.2f} {median - plain:+9.2f}  {len(ms)}")
    fabric = statistics.median(samples["%%fabric (warm, 2 ranks)"]) * 1e3
    px = statistics.median(samples["%%px (ipyparallel, 2 engines)"]) * 1e3
    verdict = "met" if fabric - plain < 8.0 else "missed"
    print(f"\ntarget warm %%fabric < plain + 8 ms: {verdict} ({fabric - plain:+.2f} ms); "
          f"%%px is {px - plain:+.2f} ms; %%fabric / %%px = {fabric / px:.2f}")


if __name__ == "__main__":
    main()
