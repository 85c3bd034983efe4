"""launch() inside a real Jupyter kernel: functions from cells, fork and spawn, output in the
cell, a kernel interrupt while ranks wait in a barrier, and no ranks after shutdown."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil
import pytest

pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

from helpers_launch import is_multiprocessing_helper  # noqa: E402

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]


class Kernel:
    """A kernel of this interpreter, and a helper to run a cell and collect what it shows."""

    def __init__(self, tmp: Path) -> None:
        spec_dir = tmp / "kernels" / "nf-launch-test"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "notebook-fabric launch test", "language": "python",
        }))
        self.manager = KernelManager(kernel_name="nf-launch-test",
                                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))
        self.manager.start_kernel(cwd=str(tmp), env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                                                     "NOTEBOOK_FABRIC_DASHBOARD": "0",  # text output is checked
                                                     "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 120) -> Dict[str, Any]:
        """Execute ``code``; returns stdout, stderr, the reply status and error name."""
        streams: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        results: List[str] = []

        def collect(message: Dict[str, Any]) -> None:
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                streams[content["name"]].append(content["text"])
            elif kind == "execute_result":
                results.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                streams["stderr"].append("\n".join(content["traceback"]))

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=collect, allow_stdin=False)
        return {"status": reply["content"]["status"], "ename": reply["content"].get("ename"),
                "stdout": "".join(streams["stdout"]), "stderr": "".join(streams["stderr"]), "result": "".join(results)}

    def descendants(self) -> List[psutil.Process]:
        pid = self.manager.provisioner.process.pid
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                and not is_multiprocessing_helper(c)]

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path):
    kernel = Kernel(tmp_path)
    yield kernel
    kernel.shutdown()


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
    assert kernel.run(DEFINE)["status"] == "ok"
    for method in ("fork", "spawn"):
        cell = kernel.run(f"launch(step, 1, accelerator='cpu', start_method={method!r}, return_all=True)")
        assert cell["status"] == "ok", cell["stderr"]
        assert cell["result"] == "[103.0, 103.0]"  # (1 + 0) + (1 + 1) + 100
        assert "[rank 0] step on rank 0" in cell["stdout"] and "[rank 1] step on rank 1" in cell["stdout"]
    assert kernel.descendants() == []


FAILING_CELL = """
def train(fabric):
    scale = 2.0
    raise ValueError(f"loss exploded on rank {fabric.global_rank} (scale {scale})")
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_remote_tracebacks_name_the_cell_and_show_its_source_line(kernel, method):
    """A function from a cell, shipped by value under spawn/forkserver, keeps its cell file name and
    source lines in the remote traceback whatever cloudpickle version is installed."""
    assert kernel.run("from notebook_fabric import launch")["status"] == "ok"
    assert kernel.run(FAILING_CELL)["status"] == "ok"
    cell = kernel.run(f"launch(train, devices=2, accelerator='cpu', start_method={method!r})")
    assert cell["status"] == "error" and cell["ename"] == "ValueError", cell
    report = re.sub(r"\x1b\[[0-9;]*m", "", cell["stderr"])
    assert "<dynamic-code>" not in report
    assert 'raise ValueError(f"loss exploded on rank' in report, report
    assert re.search(r'File "?[^\n]*ipykernel[^\n]*, line 3, in train', report), report
    assert kernel.descendants() == []


def test_kernel_interrupt_while_ranks_wait_in_a_barrier(kernel, tmp_path):
    marker = tmp_path / "rank0-waits"
    assert kernel.run(DEFINE)["status"] == "ok"
    kernel.run(f"""
def lagging(fabric):
    if fabric.global_rank == 1:
        time.sleep(300)
    open({str(marker)!r}, "w").close()
    fabric.barrier()
""")
    message_id = kernel.client.execute("launch(lagging, accelerator='cpu')")
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, "rank 0 never reached the barrier"
        time.sleep(0.05)
    time.sleep(0.3)
    ranks = kernel.descendants()
    assert len(ranks) == 2
    kernel.manager.interrupt_kernel()
    interrupted = time.monotonic()
    while True:
        reply = kernel.client.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == message_id:
            break
    assert time.monotonic() - interrupted < 20
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    psutil.wait_procs(ranks, timeout=10)
    assert kernel.descendants() == []
    after = kernel.run("launch(step, 2, accelerator='cpu')")
    assert after["status"] == "ok", after["stderr"]
    assert after["result"] == "105.0"


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
                      "pool = RankPool({'accelerator': 'cpu', 'strategy': 'ddp', 'devices': 2}, 2).start()\n"
                      "pool.pids")
    assert cell["status"] == "ok", cell["stderr"]
    ranks = [psutil.Process(pid) for pid in json.loads(cell["result"])]
    later = kernel.run("pool.run(lambda fabric, ns: fabric.global_rank)")  # the pool outlives its cell
    assert later["result"] == "{0: 0, 1: 1}", later["stderr"]
    workers = kernel.run(DATALOADER_WORKERS)
    assert workers["status"] == "ok", workers["stderr"]
    ranks += [psutil.Process(pid) for pids in json.loads(workers["result"]) for pid in pids]
    assert len(ranks) == 2 + 4
    kernel.manager.shutdown_kernel(now=True)  # SIGKILL: no atexit, only the parent-death signal
    gone, alive = psutil.wait_procs(ranks, timeout=15)  # ranks at once; workers notice their rank is gone
    assert alive == []
