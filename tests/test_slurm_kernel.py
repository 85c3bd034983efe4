"""Through a real Jupyter kernel on the two-host Slurm test bed: launch() over both hosts, and a
``%%fabric --cluster slurm`` pool that keeps state across cells, survives an interrupt mid-cell,
and leaves no job and no process after ``%fabric stop``."""
from __future__ import annotations

from typing import Iterator

import pytest

from support import slurm_bed
from support.kernels import Kernel, magics_kernel

pytestmark = pytest.mark.skipif(slurm_bed.why_no_bed() is not None, reason=slurm_bed.why_no_bed() or "")


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    slurm_bed.bring_up()
    with magics_kernel() as k:
        yield k
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()


def test_launch_in_a_kernel_returns_results_from_both_hosts(kernel: Kernel) -> None:
    kernel.ok("import socket\nfrom notebook_fabric import launch\n"
              "def host(fabric):\n    return fabric.global_rank, socket.gethostname()")
    reply = kernel.ok("launch(host, devices=2, num_nodes=2, cluster='slurm', accelerator='cpu', return_all=True)",
                      timeout=240)
    assert "[(0, 'nfnode1'), (1, 'nfnode1'), (2, 'nfnode2'), (3, 'nfnode2')]" in reply.result, reply.all_text
    assert not kernel.ranks()  # srun and everything below it are gone


def test_the_dashboard_shows_each_rank_s_host() -> None:
    slurm_bed.bring_up()
    with magics_kernel(dashboard=True) as kernel:
        kernel.ok("from notebook_fabric import launch\ndef rank(fabric):\n    return fabric.global_rank")
        reply = kernel.ok("launch(rank, devices=1, num_nodes=2, cluster='slurm', accelerator='cpu')", timeout=240)
        html = reply.text
        assert ">host</th>" in html, html[:2000]
        assert ">nfnode1</td>" in html and ">nfnode2</td>" in html, html[:4000]
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()


def test_a_slurm_pool_keeps_state_survives_an_interrupt_and_stops_clean(kernel: Kernel) -> None:
    reply = kernel.ok("%%fabric --devices 1 --num-nodes 2 --cluster slurm --accelerator cpu --no-dashboard\n"
                      "import socket\nhost = socket.gethostname()\nsteps = [fabric.global_rank]\nhost", timeout=240)
    assert "nfnode1" in reply.all_text and "nfnode2" in reply.all_text, reply.all_text
    assert slurm_bed.jobs(), "the pool holds its allocation between cells"
    reply = kernel.ok("%%fabric --no-dashboard\nsteps.append(len(steps))\n(host, steps)", timeout=120)
    assert "('nfnode1', [0, 1])" in reply.all_text and "('nfnode2', [1, 1])" in reply.all_text, reply.all_text
    kernel.ok("%%fabric --no-dashboard\nimport torch\ntotal = fabric.all_reduce(torch.ones(2), reduce_op='sum')",
              timeout=120)
    ledger = kernel.ok("%fabric ledger", timeout=60).all_text  # each rank's column names its host
    assert "rank 0 @ nfnode1" in ledger and "rank 1 @ nfnode2" in ledger, ledger
    assert "all_reduce float32[2] done" in ledger and "the ranks' ledgers agree" in ledger, ledger
    msg = kernel.send("%%fabric --no-dashboard\nimport time\nprint('looping', flush=True)\n"
                      "for _ in range(600):\n    time.sleep(0.1)")
    kernel.wait_for_output(msg, "looping", timeout=60)
    where = kernel.run_in_subshell("%fabric where", timeout=30)  # asked of both hosts' ranks mid-cell
    # both ranks answered (from both hosts), with the same stack: shown once for ranks 0-1
    assert where.status == "ok" and "ranks 0-1:" in where.stdout and "time.sleep(0.1)" in where.stdout, where.all_text
    kernel.interrupt()
    reply = kernel.collect(msg, timeout=60)
    assert reply.ename == "KeyboardInterrupt", reply.all_text
    reply = kernel.ok("%%fabric --no-dashboard\nlen(steps)", timeout=60)  # the pool survived, state intact
    assert "[ranks 0-1] 2" in reply.all_text, reply.all_text
    kernel.ok("%fabric stop", timeout=60)
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()
    assert not kernel.ranks()


def test_bad_pool_settings_are_refused_before_slurm_is_asked_for_anything(kernel: Kernel) -> None:
    asked = slurm_bed.allocation_requests()
    for option, said in (("--strategy nonsense", "strategy='nonsense' is not known"),
                         ("--precision 12-bit", "precision='12-bit' is not supported"),
                         ("--devices 5 --accelerator cpu", "devices=5 ranks per host, but the nodes of Slurm's partition")):
        reply = kernel.run(f"%%fabric --num-nodes 2 --cluster slurm {option} --no-dashboard\n1", timeout=60)
        assert reply.status == "error" and said in reply.all_text, reply.all_text
        assert "Nothing was started" in reply.all_text, reply.all_text
    assert slurm_bed.allocation_requests() == asked and slurm_bed.jobs() == []
    assert not kernel.ranks()


@pytest.mark.parametrize("how", ["sigkill", "restart"])
def test_a_kernel_that_dies_or_restarts_leaves_no_job_and_no_rank(how: str) -> None:
    import os
    import signal

    slurm_bed.bring_up()
    kernel = Kernel()
    try:
        kernel.ok("%load_ext notebook_fabric")
        reply = kernel.ok("%%fabric --devices 1 --num-nodes 2 --cluster slurm --accelerator cpu --no-dashboard\n"
                          "fabric.global_rank", timeout=240)
        assert "[rank 0] 0" in reply.all_text or "0" in reply.all_text, reply.all_text
        assert slurm_bed.jobs()
        assert [p for node in slurm_bed.NODES for p in slurm_bed.node_processes(node)]
        if how == "sigkill":
            os.kill(kernel.pid, signal.SIGKILL)
        else:
            kernel.km.restart_kernel(now=True)
        slurm_bed.assert_no_jobs(timeout=15)
        slurm_bed.assert_nodes_empty(timeout=15)
    finally:
        kernel.shutdown(now=True)


def test_breakpoint_in_a_rank_on_another_host_is_answered_from_the_notebook() -> None:
    slurm_bed.bring_up()
    with magics_kernel(allow_stdin=True) as kernel:
        kernel.ok("%%fabric --devices 1 --num-nodes 2 --cluster slurm --accelerator cpu --no-dashboard\nimport socket",
                  timeout=240)
        msg = kernel.send("%%fabric --no-dashboard\nx = 10 * (fabric.global_rank + 1)\n"
                          "if fabric.global_rank == 1:\n    breakpoint()\n    x += 1\n(socket.gethostname(), x)")
        assert kernel.prompt() == "(Pdb rank 1) "
        kernel.answer("p socket.gethostname(), x")
        assert kernel.prompt() == "(Pdb rank 1) "
        kernel.wait_for_output(msg, "('nfnode2', 20)")
        kernel.answer("c")
        reply = kernel.collect(msg, timeout=60)
        assert reply.status == "ok", reply.all_text
        assert "('nfnode1', 10)" in reply.all_text and "('nfnode2', 21)" in reply.all_text, reply.all_text
        kernel.ok("%fabric stop", timeout=60)
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()
