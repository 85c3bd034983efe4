"""Forked ranks after the notebook ran multi-threaded torch: they compute, they do not hang.

OpenMP's worker pool is not copied by ``fork``. A notebook that ran one parallel op (any matmul
of some size with more than one intra-op thread) and then called ``launch(fn)`` under fork, the
default, used to leave both ranks waiting forever inside ``F.linear``. The parent here is a real
process with several intra-op threads (the test process itself runs with one, see conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from test_cli import _MARKER, job_environment, survivors

REPO = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent(
    """
    import json
    import torch
    from notebook_fabric import launch

    torch.set_num_threads(2)
    square = torch.randn(512, 512)
    torch.nn.Linear(512, 512)(square @ square).sum()  # a parallel region in the parent

    def work(fabric):
        import torch
        torch.manual_seed(fabric.global_rank)
        x = torch.randn(256, 512)
        layer = torch.nn.Linear(512, 512)
        with torch.no_grad():
            for _ in range(3):
                x = layer(x) @ torch.eye(512)
        totals = fabric.all_gather(fabric.all_reduce(x.abs().sum(), reduce_op="sum"))
        threads = fabric.all_gather(torch.tensor(torch.get_num_threads()))
        return {"threads": threads.tolist(), "totals": totals.tolist()}

    results = launch(work, devices=2, start_method="fork", timeout=60, dashboard=False)
    print("RESULT " + json.dumps({"parent_threads": torch.get_num_threads(), "rank_zero": results}))
    """
)


def test_forked_ranks_compute_after_the_parent_ran_a_parallel_region(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    env = job_environment(marker)
    env.pop("OMP_NUM_THREADS")  # the parent gets torch's default pool, as a notebook does
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    try:
        done = subprocess.run([sys.executable, str(script)], env=env, cwd=str(REPO), text=True,
                              capture_output=True, timeout=150)  # fmt: skip
    finally:
        leftover = survivors(marker)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["parent_threads"] == 2  # the notebook keeps its own threads
    assert result["rank_zero"]["threads"] == [1, 1]  # every rank's intra-op threads
    totals = result["rank_zero"]["totals"]
    assert len(totals) == 2 and totals[0] == totals[1] > 0  # both ranks joined the same all_reduce
    assert leftover == [], f"processes left behind: {leftover}"
    assert _MARKER not in os.environ
