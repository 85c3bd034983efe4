"""Certain hangs in ``%%fabric`` cells, reported at once, and ``%fabric ledger``, through a real kernel."""
from __future__ import annotations

import re
import time
from typing import Iterator

import pytest

from support.kernels import Kernel, magics_kernel, rank_pids
from support.processes import wait_gone

pytestmark = pytest.mark.timeout(240)

POOL = "%%fabric --devices 2 --accelerator cpu --strategy ddp --stall 60 --timeout 120"


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    with magics_kernel() as k:
        yield k


def test_save_under_is_global_zero_in_a_cell_is_reported_at_once_and_the_ledger_shows_it(kernel: Kernel,
                                                                                          tmp_path) -> None:
    kernel.ok(f"{POOL}\nimport torch\nmodel = fabric.setup(torch.nn.Linear(4, 3))")
    pids = rank_pids(kernel)
    started = time.monotonic()
    reply = kernel.run(f"{POOL}\n"
                       "for step in range(2):\n"
                       "    fabric.backward(model(torch.ones(2, 4)).sum())\n"
                       "if fabric.is_global_zero:\n"
                       f"    fabric.save({str(tmp_path / 'ckpt.pt')!r}, {{'model': model}})\n")
    elapsed = time.monotonic() - started
    assert elapsed < 20, elapsed  # the stall report would need 60 s, the timeout 120 s
    assert reply.ename == "CollectiveHangError", reply.all_text
    text = reply.error_text
    assert re.search(r"rank 0 waits in barrier #\d+ \(name='save_checkpoint'\) at cell line 5: fabric.save\(", text), text
    assert "rank 1 finished the cell without calling it" in text
    assert re.search(r"its last collective there was torch-internal all_reduce #\d+ \(float32\[15\]\)", text), text
    assert "`if fabric.is_global_zero:`" in text and "every rank must call it" in text
    assert "The pool was stopped" in text
    assert wait_gone(pids) == []  # no rank left behind

    ledger = kernel.ok("%fabric ledger").stdout
    assert re.search(r">> world +#\d+ \| barrier WAITING +\| - +\| cell line 5: fabric.save\(", ledger), ledger
    reduces = re.findall(r"world +#(\d+) \| torch:all_reduce float32\[15\] done +\| torch:all_reduce float32\[15\] done",
                         ledger)
    assert len(reduces) == 2 and int(reduces[1]) > int(reduces[0]), ledger  # DDP's bucket all-reduces, numbered
    last = kernel.ok("%fabric ledger --last 1").stdout
    assert "fabric.save(" in last and "torch:all_reduce" not in last

    assert kernel.ok(f"{POOL}\nfabric.world_size").result == "[ranks 0-1] 2"  # a fresh pool serves the next cell


def test_a_ddp_step_in_a_ranks_subset_cell_is_reported_at_once(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport torch\nnet = fabric.setup(torch.nn.Linear(4, 3))\n"
              "fabric.backward(net(torch.ones(2, 4)).sum())")
    pids = rank_pids(kernel)
    started = time.monotonic()
    reply = kernel.run("%%fabric --ranks 0 --stall 60 --timeout 120\nloss = net(torch.ones(2, 4)).sum()\n"
                       "fabric.backward(loss)")
    assert time.monotonic() - started < 20
    assert reply.ename == "CollectiveHangError", reply.all_text
    assert re.search(r"rank 0 waits in DDP's \S+ #\d+ .* at cell line \d+", reply.error_text), reply.error_text
    assert "rank 1 is not running the cell (--ranks)" in reply.error_text
    assert wait_gone(pids) == []
