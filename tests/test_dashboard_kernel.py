"""The dashboard through a real kernel (jupyter_client): what the notebook receives.

- ``%%fabric`` with a failing rank: the cell errors as before, and the frozen summary marks that
  rank red with the error's one-line summary;
- ``launch(fn)`` logging with ``fabric.log``: the summary carries the plot; widgets were sent live
  and closed at the end; nothing is left that needs the kernel to render;
- informational launcher messages ("started 2 ranks ...") come on stdout, not the red stderr;
- a quick silent cell adds nothing (no widget is even opened).
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Dict, Iterator, List

import psutil
import pytest

pytest.importorskip("ipywidgets")
from jupyter_client.manager import KernelManager  # noqa: E402

from helpers_launch import is_multiprocessing_helper  # noqa: E402

pytestmark = pytest.mark.timeout(240)
WIDGET = "application/vnd.jupyter.widget-view+json"


class Kernel:
    def __init__(self) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        self.manager.start_kernel(env={**os.environ, "OMP_NUM_THREADS": "1", "NOTEBOOK_FABRIC_DASHBOARD": "1"})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def run(self, code: str, interrupt_when: Any = None) -> Dict[str, Any]:
        """Run ``code``; with ``interrupt_when`` (a callable), interrupt the kernel once it returns true."""
        seen: Dict[str, Any] = {"stdout": "", "stderr": "", "displays": {}, "types": [], "ename": None}

        def collect(message: Dict[str, Any]) -> None:
            kind, content = message["msg_type"], message["content"]
            seen["types"].append(kind)
            if kind == "stream":
                seen[content["name"]] += content["text"]
            elif kind in ("display_data", "update_display_data"):
                display_id = content.get("transient", {}).get("display_id")
                seen["displays"][display_id] = content["data"]  # an update replaces what was shown
            elif kind == "error":
                seen["ename"] = content["ename"]

        if interrupt_when is None:
            self.client.execute_interactive(code, timeout=180, output_hook=collect, allow_stdin=False)
            return seen
        msg_id = self.client.execute(code)
        deadline = time.monotonic() + 120
        while not interrupt_when():
            assert time.monotonic() < deadline, "the condition to interrupt never came"
            time.sleep(0.05)
        self.manager.interrupt_kernel()
        while True:
            message = self.client.get_iopub_msg(timeout=120)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            collect(message)
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return seen

    def ranks(self) -> List[psutil.Process]:
        try:
            children = psutil.Process(self.manager.provisioner.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                and not is_multiprocessing_helper(c)]

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        yield k
    finally:
        k.shutdown()


def test_magic_failure_is_red_in_the_summary_and_info_is_not_on_stderr(kernel: Kernel) -> None:
    assert kernel.run("%load_ext notebook_fabric")["ename"] is None
    cell = kernel.run("%%fabric --devices 2 --accelerator cpu\n"
                      "print(f'working on rank {fabric.global_rank}')\n"
                      "fabric.barrier('check')\n"
                      "if fabric.global_rank == 1:\n"
                      "    raise ValueError('bad batch on rank 1')\n")
    assert cell["ename"] == "ValueError"
    assert "[notebook-fabric] started 2 ranks" in cell["stdout"] and "started" not in cell["stderr"]
    (summary,) = cell["displays"].values()
    assert WIDGET not in summary and "comm_open" in cell["types"] and "comm_close" in cell["types"]
    row = re.search(r'<tr class="nbf-rank" data-rank="1" style="([^"]*)">(.*?)</tr>', summary["text/html"])
    assert row and "color:#c62828" in row.group(1) and "failed: ValueError: bad batch on rank 1" in row.group(2)
    assert "[rank 0] working on rank 0" in summary["text/plain"]
    assert re.search(r"^1\s+failed: ValueError: bad batch on rank 1", summary["text/plain"], re.M)
    quiet = kernel.run("%%fabric\nx = 1")  # quick and silent: no dashboard, not even a widget opened
    assert quiet["ename"] is None and quiet["displays"] == {} and "comm_open" not in quiet["types"]
    assert kernel.run("%fabric stop")["ename"] is None
    assert psutil.wait_procs(kernel.ranks(), timeout=10)[1] == []


def test_launch_summary_has_the_plot_and_the_text_fallback(kernel: Kernel) -> None:
    cell = kernel.run("from notebook_fabric import launch\n"
                      "def train(fabric):\n"
                      "    for step in range(20):\n"
                      "        fabric.log_dict({'loss': 1.0 / (step + 1), 'lr': 0.1}, step=step)\n"
                      "    print('trained')\n"
                      "    return 'ok'\n"
                      "launch(train, devices=2, accelerator='cpu')")
    assert cell["ename"] is None
    (summary,) = cell["displays"].values()
    assert WIDGET not in summary
    assert summary["text/html"].count("<polyline") == 2 and "loss = 0.05" in summary["text/html"]
    assert "loss: 1 -> 0.05 over 20 points" in summary["text/plain"]
    assert "[rank 0] trained" in summary["text/plain"]
    off = kernel.run("launch(train, devices=2, accelerator='cpu', dashboard=False)")
    assert off["displays"] == {} and "[rank 0] trained" in off["stdout"]
    assert psutil.wait_procs(kernel.ranks(), timeout=10)[1] == []


def test_interrupting_a_dashboard_cell_freezes_it_and_ends_no_rank_badly(kernel: Kernel, tmp_path) -> None:
    marker = tmp_path / "rank0-at-barrier"
    assert kernel.run("%load_ext notebook_fabric")["ename"] is None
    cell = kernel.run("%%fabric --devices 2 --accelerator cpu\n"
                      "import time\n"
                      "print(f'rank {fabric.global_rank} before the barrier')\n"
                      "if fabric.global_rank == 1:\n"
                      "    time.sleep(300)\n"
                      f"open({str(marker)!r}, 'w').close()\n"
                      "fabric.barrier('never_met')\n",
                      interrupt_when=lambda: marker.exists() and (time.sleep(0.5) or True))
    assert cell["ename"] == "KeyboardInterrupt"
    (summary,) = cell["displays"].values()
    assert WIDGET not in summary
    # rank 1 took the KeyboardInterrupt; rank 0, stuck in gloo's barrier, was ended by the pool
    assert re.search(r"^0\s+stopped while at barrier 'never_met' for \d", summary["text/plain"], re.M), summary["text/plain"]
    assert re.search(r"^1\s+interrupted", summary["text/plain"], re.M), summary["text/plain"]
    assert "[rank 0] rank 0 before the barrier" in summary["text/plain"]
    assert kernel.run("%fabric stop")["ename"] is None
    assert psutil.wait_procs(kernel.ranks(), timeout=10)[1] == []

