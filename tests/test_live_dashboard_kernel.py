"""The dashboard through a real kernel (jupyter_client): what the notebook receives.

- ``%%fabric`` with a failing rank: the cell errors as before, and the frozen summary marks that
  rank red with the error's one-line summary;
- ``launch(fn)`` logging with ``fabric.log``: the summary carries the plot; widgets were sent live
  and closed at the end; nothing is left that needs the kernel to render;
- informational launcher messages ("started 2 ranks ...") come on stdout, not the red stderr;
- a quick silent cell adds nothing (no widget is even opened).
"""
from __future__ import annotations

import re
from typing import Iterator

import psutil
import pytest

pytest.importorskip("ipywidgets")
from support.kernels import Kernel  # noqa: E402
from support.waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(240)
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    k = Kernel(dashboard=True)
    try:
        yield k
    finally:
        k.shutdown(now=True)


def test_magic_failure_is_red_in_the_summary_and_info_is_not_on_stderr(kernel: Kernel) -> None:
    assert kernel.run("%load_ext notebook_fabric").ename == ""
    cell = kernel.run("%%fabric --devices 2 --accelerator cpu\n"
                      "print(f'working on rank {fabric.global_rank}')\n"
                      "fabric.barrier('check')\n"
                      "if fabric.global_rank == 1:\n"
                      "    raise ValueError('bad batch on rank 1')\n")
    assert cell.ename == "ValueError"
    assert "[notebook-fabric] started 2 ranks" in cell.stdout and "started" not in cell.stderr
    (summary,) = cell.displays.values()
    assert WIDGET not in summary and "comm_open" in cell.types and "comm_close" in cell.types
    row = re.search(r'<tr class="nbf-rank" data-rank="1" style="([^"]*)">(.*?)</tr>', summary["text/html"])
    assert row and "color:#c62828" in row.group(1) and "failed: ValueError: bad batch on rank 1" in row.group(2)
    assert "[rank 0] working on rank 0" in summary["text/plain"]
    assert re.search(r"^1\s+failed: ValueError: bad batch on rank 1", summary["text/plain"], re.M)
    quiet = kernel.run("%%fabric\nx = 1")  # quick and silent: no dashboard, not even a widget opened
    assert quiet.ename == "" and quiet.displays == {} and "comm_open" not in quiet.types
    assert kernel.run("%fabric stop").ename == ""
    assert psutil.wait_procs(kernel.ranks(), timeout=10)[1] == []


def test_launch_summary_has_the_plot_and_the_text_fallback(kernel: Kernel) -> None:
    cell = kernel.run("from notebook_fabric import launch\n"
                      "def train(fabric):\n"
                      "    for step in range(20):\n"
                      "        fabric.log_dict({'loss': 1.0 / (step + 1), 'lr': 0.1}, step=step)\n"
                      "    print('trained')\n"
                      "    return 'ok'\n"
                      "launch(train, devices=2, accelerator='cpu')")
    assert cell.ename == ""
    (summary,) = cell.displays.values()
    assert WIDGET not in summary
    assert summary["text/html"].count("<polyline") == 2 and "loss = 0.05" in summary["text/html"]
    assert "loss: 1 -> 0.05 over 20 points" in summary["text/plain"]
    assert "[rank 0] trained" in summary["text/plain"]
    off = kernel.run("launch(train, devices=2, accelerator='cpu', dashboard=False)")
    assert off.displays == {} and "[rank 0] trained" in off.stdout
    assert psutil.wait_procs(kernel.ranks(), timeout=10)[1] == []


def test_interrupting_a_dashboard_cell_freezes_it_and_ends_no_rank_badly(kernel: Kernel) -> None:
    assert kernel.run("%load_ext notebook_fabric").ename == ""
    msg = kernel.send("%%fabric --devices 2 --accelerator cpu\n"
                      "import time\n"
                      "print(f'rank {fabric.global_rank} before the barrier')\n"
                      "if fabric.global_rank == 1:\n"
                      "    time.sleep(300)\n"
                      "fabric.barrier('never_met')\n")
    # interrupt once the pool shows rank 0 inside the barrier (rank 1 is then in its sleep)
    wait_until(lambda: re.search(r"^0\s+\d+\s+in barrier", kernel.status(), re.M), 120,
               "%fabric status to show rank 0 in the barrier", describe=kernel.status)
    kernel.interrupt()
    cell = kernel.collect(msg, timeout=120)
    assert cell.ename == "KeyboardInterrupt"
    (summary,) = cell.displays.values()
    assert WIDGET not in summary
    # rank 1 took the KeyboardInterrupt; rank 0, stuck in gloo's barrier, was ended by the pool
    assert re.search(r"^0\s+stopped while at barrier 'never_met' for \d", summary["text/plain"], re.M), summary["text/plain"]
    assert re.search(r"^1\s+interrupted", summary["text/plain"], re.M), summary["text/plain"]
    assert "[rank 0] rank 0 before the barrier" in summary["text/plain"]
    assert kernel.run("%fabric stop").ename == ""
    assert psutil.wait_procs(kernel.ranks(), timeout=10)[1] == []
