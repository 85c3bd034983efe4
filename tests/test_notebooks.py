"""Every notebook under notebooks/ runs top to bottom through a real kernel, and its outputs are checked.

The kernel is this venv's Python (whatever the installed ``python3`` kernelspec says), started by
a ``KernelManager`` handed to nbclient. Cells assert on their own results too (e.g. the loss falls);
here we check the outputs a reader sees: values per rank, the training log, the refused collective.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import List

import nbformat
import psutil
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    """Run ``notebooks/<name>`` in a fresh kernel; fail on the first cell error; check no rank outlives it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    client = NotebookClient(nb, km=km, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    leftovers: List[int] = []
    with client.setup_kernel(env={**os.environ}):
        kernel_pid = km.provisioner.pid
        client.execute(cleanup_kc=False)
        leftovers = [p.pid for p in psutil.Process(kernel_pid).children(recursive=True)]
    km.shutdown_kernel(now=True)  # nbclient leaves a kernel it did not create running
    assert not _alive(leftovers), f"{name} left processes behind: {leftovers}"
    return nb


def _alive(pids: List[int]) -> List[int]:
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    return [p.pid for p in alive]


def text_of(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell showed, as text."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            parts.append(output["data"].get("text/plain", ""))
        elif output["output_type"] == "error":
            parts.append("\n".join(output["traceback"]))
    return "\n".join(parts)


def cell_with(nb: nbformat.NotebookNode, snippet: str) -> str:
    """The output text of the first code cell whose source contains ``snippet``."""
    for cell in nb.cells:
        if cell.cell_type == "code" and snippet in cell.source:
            return text_of(cell)
    raise AssertionError(f"no cell contains {snippet!r}")


def test_quickstart_trains_on_two_ranks() -> None:
    nb = execute("quickstart.ipynb")
    setup = cell_with(nb, "len(X_local)")
    assert "[rank 0] (0, 256)" in setup and "[rank 1] (1, 256)" in setup
    log = cell_with(nb, "--out losses")
    first, last = (float(v) for v in re.search(r"loss ([\d.]+) -> ([\d.]+)", log).groups())
    assert last < 0.5 * first
    assert "[rank 0] step  0" in log and "[rank 1]" not in log  # rank 0's output only, by default
    assert cell_with(nb, "p.detach().sum()").startswith("[ranks 0-1] ")  # replicas identical
    assert "[rank 1] (torch.Size([256, 8]), 1)" in cell_with(nb, "--ranks 1")
    assert re.search(r"^1\s+\d+\s+idle", cell_with(nb, "%fabric status"), re.M)
    assert "stopped the pool (2 ranks)" in cell_with(nb, "%fabric stop")


def test_launch_fn_notebook() -> None:
    nb = execute("launch_fn.ipynb")
    first, last = (float(v) for v in re.findall(r"[\d.]+", cell_with(nb, "losses = launch(train"))[-2:])
    assert last < 0.5 * first
    assert "[(0, 2), (1, 2)]" in cell_with(nb, "return_all=True")
    assert "ValueError bad batch on rank 1 | rank: 1" in cell_with(nb, "fails_on_rank_1")


def test_collectives_notebook() -> None:
    nb = execute("collectives.ipynb")
    start = cell_with(nb, "x = torch.tensor")
    assert "[rank 0] tensor([1.])" in start and "[rank 1] tensor([2.])" in start
    assert "[ranks 0-1] tensor([3.])" in cell_with(nb, 'fabric.all_reduce(x, reduce_op="sum")')
    assert "[ranks 0-1] (tensor([1.5000]), tensor([2.]))" in cell_with(nb, 'reduce_op="mean")')
    assert "[ranks 0-1] 'hello from rank 1'" in cell_with(nb, "fabric.broadcast")
    barrier = cell_with(nb, "fabric.barrier")
    assert "[rank 0] rank 0 passed the barrier" in barrier and "[rank 1] rank 1 passed the barrier" in barrier
    refused = cell_with(nb, "--ranks 0")
    assert "refused:" in refused and "rank 1 is not running it" in refused
    assert "gathered <- every rank" in cell_with(nb, "%fabric pull gathered --all")


def outputs_with(nb: nbformat.NotebookNode, snippet: str) -> List[nbformat.NotebookNode]:
    """The outputs of the first code cell whose source contains ``snippet``."""
    for cell in nb.cells:
        if cell.cell_type == "code" and snippet in cell.source:
            return list(cell.get("outputs", []))
    raise AssertionError(f"no cell contains {snippet!r}")


def test_dashboard_notebook_keeps_frozen_summaries() -> None:
    """The dashboards froze into summaries: HTML and text, no widget left that needs a kernel."""
    nb = execute("dashboard.ipynb")
    for snippet in ("final_loss = launch(train", "%%fabric --devices 2"):
        displays = [o for o in outputs_with(nb, snippet) if o["output_type"] == "display_data"]
        assert len(displays) == 1, displays
        data = displays[0]["data"]
        assert "application/vnd.jupyter.widget-view+json" not in data
        assert 'class="nbf-summary"' in data["text/html"] and data["text/html"].count('class="nbf-rank"') == 2
        assert "at barrier &#x27;save_checkpoint&#x27;" in data["text/html"]
    launched = cell_with(nb, "final_loss = launch(train")
    assert "[rank 0] rank 0: final loss" in launched and "[rank 1]" not in launched
    assert re.search(r"loss: [\d.]+ -> [\d.]+ over 40 points", launched)
    assert '<svg' in [o for o in outputs_with(nb, "final_loss = launch(train") if o["output_type"] == "display_data"][0]["data"]["text/html"]
    cell = cell_with(nb, "%%fabric --devices 2")
    assert "[rank 0] hello from rank 0" in cell and "[rank 0] rank 0 passed the barrier" in cell
    assert "[rank 0] plain text from rank 0" in cell_with(nb, "--no-dashboard")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
