"""launch() inside a real Jupyter kernel: functions from cells, fork and spawn, output in the
cell, a kernel interrupt while ranks wait in a barrier, and no ranks after shutdown."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

pytest.importorskip("ipykernel")
from support.kernels import REPO, TESTS, Kernel, plain  # noqa: E402
from support.waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def kernel(tmp_path) -> Iterator[Kernel]:
    """A kernel of this interpreter with a bare environment (not the test process's), in ``tmp_path``."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{TESTS}",
           "NOTEBOOK_FABRIC_DASHBOARD": "0",  # text output is checked
           "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    kernel = Kernel(env=env, cwd=tmp_path)
    yield kernel
    kernel.shutdown(now=True)


DEFINE = """
import torch, time
from notebook_fabric import launch

offset = 100  # a notebook variable the function closes over

def step(fabric, x):
    print(f"step on rank {fabric.global_rank}")
    total = fabric.all_reduce(torch.tensor([float(x + fabric.global_rank)]), reduce_op="sum")
    return total.item() + offset
"""


def test_functions_defined_in_cells_run_under_fork_and_spawn(kernel):
    assert kernel.run(DEFINE).status == "ok"
    for method in ("fork", "spawn"):
        cell = kernel.run(f"launch(step, 1, accelerator='cpu', start_method={method!r}, return_all=True)")
        assert cell.status == "ok", cell.all_text
        assert cell.result == "[103.0, 103.0]"  # (1 + 0) + (1 + 1) + 100
        assert "[rank 0] step on rank 0" in cell.stdout and "[rank 1] step on rank 1" in cell.stdout
    assert kernel.ranks() == []


FAILING_CELL = """
def train(fabric):
    scale = 2.0
    raise ValueError(f"loss exploded on rank {fabric.global_rank} (scale {scale})")
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_remote_tracebacks_name_the_cell_and_show_its_source_line(kernel, method):
    """A function from a cell, shipped by value under spawn/forkserver, keeps its cell file name and
    source lines in the remote traceback whatever cloudpickle version is installed."""
    assert kernel.run("from notebook_fabric import launch").status == "ok"
    assert kernel.run(FAILING_CELL).status == "ok"
    cell = kernel.run(f"launch(train, devices=2, accelerator='cpu', start_method={method!r})")
    assert cell.status == "error" and cell.ename == "ValueError", cell
    report = plain(cell.stderr + "\n" + cell.error_text)
    assert "<dynamic-code>" not in report
    assert 'raise ValueError(f"loss exploded on rank' in report, report
    assert re.search(r'File "?[^\n]*ipykernel[^\n]*, line 3, in train', report), report
    assert kernel.ranks() == []


def test_kernel_interrupt_while_ranks_wait_in_a_barrier(kernel, tmp_path):
    marker = tmp_path / "in-task"
    assert kernel.run(DEFINE).status == "ok"
    kernel.ok(f"""
from support.processes import touch, touch_once_main_thread_waits_in

def lagging(fabric):
    if fabric.global_rank == 1:
        touch({str(marker)!r} + "1")  # inside its task: the interrupt will land in the sleep
        time.sleep(300)
    touch_once_main_thread_waits_in("barrier", {str(marker)!r} + "0")
    fabric.barrier()
""")
    message_id = kernel.send("launch(lagging, accelerator='cpu')")
    wait_until(lambda: Path(f"{marker}1").exists() and Path(f"{marker}0").exists(), 120,
               "rank 1 in its sleep and rank 0's main thread inside the barrier")
    ranks = kernel.ranks()
    assert len(ranks) == 2
    kernel.interrupt()
    interrupted = time.monotonic()
    reply = kernel.collect(message_id, timeout=60)
    assert time.monotonic() - interrupted < 20
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt"
    psutil.wait_procs(ranks, timeout=10)
    assert kernel.ranks() == []
    after = kernel.run("launch(step, 2, accelerator='cpu')")
    assert after.status == "ok", after.all_text
    assert after.result == "105.0"


DATALOADER_WORKERS = """
import os, torch

class WorkerPids(torch.utils.data.Dataset):
    def __len__(self):
        return 2
    def __getitem__(self, index):
        return os.getpid()

def start_workers(fabric, ns):
    loader = torch.utils.data.DataLoader(WorkerPids(), batch_size=1, num_workers=2, persistent_workers=True)
    ns["batches"] = iter(loader)  # keep the workers alive
    return sorted({int(next(ns["batches"])) for _ in range(2)})

[pids for rank, pids in sorted(pool.run(start_workers).items())]
"""


def test_ranks_and_their_dataloader_workers_end_with_the_kernel(kernel):
    kernel.run(DEFINE)
    cell = kernel.run("from notebook_fabric.launching.pool import RankPool\n"
                      "from notebook_fabric.fabric import build_rank_fabric\n"
                      "pool = RankPool({'accelerator': 'cpu', 'strategy': 'ddp', 'devices': 2}, 2,\n"
                      "                make_fabric=build_rank_fabric).start()\n"
                      "pool.pids")
    assert cell.status == "ok", cell.all_text
    ranks = [psutil.Process(pid) for pid in json.loads(cell.result)]
    later = kernel.run("pool.run(lambda fabric, ns: fabric.global_rank)")  # the pool outlives its cell
    assert later.result == "{0: 0, 1: 1}", later.all_text
    workers = kernel.run(DATALOADER_WORKERS)
    assert workers.status == "ok", workers.all_text
    ranks += [psutil.Process(pid) for pids in json.loads(workers.result) for pid in pids]
    assert len(ranks) == 2 + 4
    kernel.km.shutdown_kernel(now=True)  # SIGKILL: no atexit, only the parent-death signal
    gone, alive = psutil.wait_procs(ranks, timeout=15)  # ranks at once; workers notice their rank is gone
    assert alive == []


BARE_LAUNCH = """
import time
from notebook_fabric import Fabric

f = Fabric(accelerator="cpu", devices=2, strategy="ddp")
began = time.monotonic()
try:
    f.launch()
finally:
    print(f"refused after {time.monotonic() - began:.3f} s")
"""


def test_a_bare_launch_in_a_kernel_is_refused_before_anything_starts_and_launch_fn_still_works(kernel):
    """``fabric.launch()`` with no function would re-run the kernel's own command line (a second kernel on
    the same ports): it raises at once, naming what works in a notebook, and starts nothing; the same
    Fabric then runs a function on its ranks."""
    assert kernel.run(DEFINE).status == "ok"
    cell = kernel.run(BARE_LAUNCH, timeout=60)
    assert cell.status == "error" and cell.ename == "RuntimeError", cell.all_text
    assert "fabric.launch(train_fn)" in cell.evalue and "strategy='ddp_notebook'" in cell.evalue, cell.evalue
    assert "refused after" in cell.stdout
    assert kernel.ranks() == []
    cell = kernel.run("f.launch(step, 1)")
    assert cell.status == "ok", cell.all_text
    assert cell.result == "103.0"  # rank 0's value: (1 + 0) + (1 + 1) + 100
    assert kernel.ranks() == []
