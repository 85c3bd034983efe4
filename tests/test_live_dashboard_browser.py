"""The dashboard in a real browser: JupyterLab 4 and Notebook 7 on loopback, headless Chromium
(Debian's), Playwright.

A notebook runs a ``%%fabric --devices 2`` cell whose ranks print, draw a tqdm bar, log a loss and
pass a named barrier (rank 1 arrives late, so rank 0 is seen waiting there). While it runs the rendered page must show both
rank rows, a memory figure, the barrier's name and rank 0's lines; afterwards the frozen summary.
Screenshots of both go to ``$NOTEBOOK_FABRIC_ARTIFACTS`` (default ``artifacts/`` in the repository).

Skipped, with the reason, only when Chromium or Playwright is not installed (``.ci/run`` installs
both; JupyterLab comes with the ``dev`` extra).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("NOTEBOOK_FABRIC_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("NOTEBOOK_FABRIC_ARTIFACTS", REPO / "artifacts"))

if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")

pytestmark = pytest.mark.timeout(300)

CELL = """%%fabric --devices 2 --accelerator cpu
import time
print(f"hello from rank {fabric.global_rank}")
from tqdm.auto import tqdm
for i in range(3):
    print(f"rank {fabric.global_rank} line {i}")
for step in tqdm(range(20), desc="epoch"):
    fabric.log("loss", 1.0 / (step + 1), step=step)
    time.sleep(0.02)
if fabric.global_rank == 1:
    time.sleep(6)  # rank 0 waits at the barrier meanwhile
fabric.barrier("save_checkpoint")
print(f"rank {fabric.global_rank} passed the barrier")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": source}
             for source in ("%load_ext notebook_fabric", CELL)]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                             "language": "python"}},
                                "nbformat": 4, "nbformat_minor": 5}))


class Lab:
    """A JupyterLab 4 (``front_end="lab"``) or Notebook 7 (``"notebook"``) server on 127.0.0.1
    with a random token, serving ``root``."""

    def __init__(self, root: Path, front_end: str = "lab") -> None:
        self.front_end = front_end
        self.port, self.token = _free_port(), secrets.token_hex(16)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NOTEBOOK_FABRIC_DASHBOARD": "1",
               "JUPYTER_CONFIG_DIR": str(root / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
        self.log = open(root / "lab.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab" if front_end == "lab" else "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             f"--IdentityProvider.token={self.token}", "--allow-root", f"--ServerApp.root_dir={root}",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=str(root), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                assert self.process.poll() is None, (root / "lab.log").read_text()
                assert time.monotonic() < deadline, "JupyterLab did not start within 90 s"
                time.sleep(0.3)

    def url(self, path: str) -> str:
        route = "lab/tree" if self.front_end == "lab" else "notebooks"
        return f"http://127.0.0.1:{self.port}/{route}/{path}?token={self.token}"

    def tree(self) -> List[psutil.Process]:
        try:
            return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> List[psutil.Process]:
        """Stop the server (it shuts its kernels down); what is still alive afterwards."""
        processes = self.tree()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        gone, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            process.kill()
        self.log.close()
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _run_first_cell(page, attempts: int = 30) -> None:
    """Run the first cell, again until its prompt shows it ran (the kernel may still be connecting)."""
    prompt = page.locator(".jp-Cell").first.locator(".jp-InputPrompt")
    for _ in range(attempts):
        page.locator(".jp-Cell").first.click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function("(el) => /\\[\\d+\\]/.test(el.innerText)", arg=prompt.element_handle(),
                                   timeout=5_000)
            return
        except sync_api.TimeoutError:
            page.locator(".jp-Cell").first.click()
    raise AssertionError("the first cell never ran")


@pytest.fixture(params=["lab", "notebook"], ids=["jupyterlab4", "notebook7"])
def lab(request, tmp_path) -> Iterator[Lab]:
    server = Lab(tmp_path, request.param)
    try:
        yield server
    finally:
        assert server.stop() == []


def test_fabric_cell_dashboard_renders_in_jupyterlab(lab: Lab, tmp_path: Path) -> None:
    _notebook(tmp_path / "dashboard.ipynb")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                                             headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(lab.url("dashboard.ipynb"), timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            _run_first_cell(page)  # %load_ext, once the kernel answers
            page.keyboard.press("Shift+Enter")  # the %%fabric cell
            # live: rank 0 waits at the named barrier while rank 1 sleeps
            table = page.locator("table.nbf-table")
            table.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('tr.nbf-rank')].some(r => r.innerText.includes(\"at barrier 'save_checkpoint'\"))",
                timeout=60_000)
            page.wait_for_timeout(600)
            page.screenshot(path=str(ARTIFACTS / f"dashboard-live-{lab.front_end}.png"), full_page=True)
            live_rows = page.locator("tr.nbf-rank").all_inner_texts()
            live_header = page.locator(".jp-OutputArea", has=page.locator("table.nbf-table")).inner_text()
            live_output = page.locator(".nbf-output").first.inner_text()
            # frozen: the summary replaces the widgets when the cell ends
            page.wait_for_selector(".nbf-summary", timeout=60_000)
            page.wait_for_timeout(300)
            page.screenshot(path=str(ARTIFACTS / f"dashboard-summary-{lab.front_end}.png"), full_page=True)
            summary = page.locator(".nbf-summary").inner_text()
            summary_rows = page.locator(".nbf-summary tr.nbf-rank").all_inner_texts()
            plot_lines = page.locator(".nbf-summary .nbf-plot svg polyline").count()
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"dashboard-failure-{lab.front_end}.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert re.search(r"%%fabric · 2 ranks · running · \d+ s", live_header), live_header
    assert len(live_rows) == 2 and live_rows[0].startswith("0") and live_rows[1].startswith("1"), live_rows
    assert "at barrier 'save_checkpoint'" in live_rows[0], live_rows
    assert all(re.search(r"RSS \d+(\.\d)? MiB", row) for row in live_rows), live_rows
    assert "hello from rank 0" in live_output and "rank 0 line 2" in live_output, live_output
    assert len(summary_rows) == 2 and all("done" in row for row in summary_rows), summary_rows
    assert all("at barrier 'save_checkpoint'" in row and re.search(r"RSS peak \d+(\.\d)? MiB", row)
               for row in summary_rows), summary_rows
    assert all("epoch 20/20" in row for row in summary_rows), summary_rows  # each rank's tqdm bar, full
    assert plot_lines == 1 and "loss = 0.05" in summary
    lines = [line for line in summary.splitlines() if line.startswith(("hello from rank 0", "rank 0 "))]
    assert lines == ["hello from rank 0", "rank 0 line 0", "rank 0 line 1", "rank 0 line 2",
                     "rank 0 passed the barrier"], summary
