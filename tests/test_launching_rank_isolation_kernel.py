"""A rank is never the kernel: ``tqdm.auto`` inside ``launch(fn)`` and ``%%fabric`` in a real kernel.

The notebook imports ``tqdm.auto`` first (so under fork the rank inherits the notebook's widget
bar class and the kernel's IPython, comm and session state). The bar's final state must reach the
notebook, and the kernel's own log (its stderr, captured to a file) and the cell must show no
"attempted to send message from fork".
"""
from __future__ import annotations

import re
from typing import Iterator

import psutil
import pytest

pytest.importorskip("ipykernel")
from support.kernels import Kernel, kernel_environment  # noqa: E402

pytestmark = pytest.mark.timeout(300)
METHODS = ["fork", "spawn", "forkserver"]
FORK_WARNING = "send message from fork"


class LoggedKernel(Kernel):
    """A kernel whose own stdout/stderr (its log) go to a file."""

    def __init__(self, tmp, dashboard: bool) -> None:
        self.dashboard = dashboard
        self.log_path = tmp / "kernel.log"
        self._log = open(self.log_path, "w")
        super().__init__(env=kernel_environment(dashboard), cwd=tmp, log=self._log)

    def run(self, code: str, timeout: float = 180.0):
        return super().run(code, timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()


@pytest.fixture(params=[False, True], ids=["text", "dashboard"])
def kernel(request, tmp_path) -> Iterator[LoggedKernel]:
    k = LoggedKernel(tmp_path, dashboard=request.param)
    try:
        yield k
    finally:
        k.shutdown(now=True)
        k._log.close()


SETUP = """
import time
import tqdm.notebook as tqdm_notebook
from tqdm.auto import tqdm
from notebook_fabric import launch
assert tqdm_notebook.tqdm_notebook in tqdm.__mro__  # the widget bar, here

def loop(fabric):
    for _ in tqdm(range(40), desc=f"rank{fabric.global_rank}", mininterval=0):
        time.sleep(0.005)
    fabric.barrier()
    return "looped"
"""

MAGIC_CELL = """%%fabric --devices 2 --accelerator cpu --start-method {method}
from tqdm.auto import tqdm as rank_tqdm
for _ in rank_tqdm(range(40), desc=f"rank{{fabric.global_rank}}", mininterval=0):
    time.sleep(0.005)
fabric.barrier()
"""


def _final_bar(text: str, rank: int) -> bool:
    """The bar of ``rank`` ended full: tqdm's last text line (``rank0: 100%|...| 40/40``), printed as
    text or kept in the dashboard's summary."""
    return re.search(rf"rank{rank}: 100%\S*\s*\S* 40/40 ", text) is not None


@pytest.mark.parametrize("method", METHODS)
def test_tqdm_auto_in_ranks_is_a_text_bar_that_reaches_the_notebook(kernel: LoggedKernel, method: str) -> None:
    assert kernel.run(SETUP).status == "ok"
    cell = kernel.run(f"launch(loop, accelerator='cpu', start_method={method!r})")
    assert cell.status == "ok", cell.text
    assert "looped" in cell.text
    assert _final_bar(cell.text, 0), cell.text
    assert FORK_WARNING not in cell.text
    assert kernel.run("%load_ext notebook_fabric").status == "ok"
    magic = kernel.run(MAGIC_CELL.format(method=method))
    assert magic.status == "ok", magic.text
    assert _final_bar(magic.text, 0), magic.text
    assert FORK_WARNING not in magic.text
    assert kernel.run("%fabric stop").status == "ok"
    # every rank gone: nothing forked from the kernel is left to write the warning to its log
    gone, alive = psutil.wait_procs(kernel.ranks(), timeout=10)
    assert alive == []
    assert FORK_WARNING not in kernel.log(), kernel.log()
    if kernel.dashboard:  # the dashboard drew the bar too, and its summary shows it full
        assert re.search(r"rank0 40/40 \([\d.]+ it/s\)", cell.text) and "rank0 40/40" in magic.text
