"""Stepping into a rank from a real Jupyter kernel: ``breakpoint()``, ``input()``, ``%fabric debug``,
``launch(..., post_mortem=True)``, an interrupt at the prompt, and a kernel without stdin.

The kernel is driven with jupyter_client as a notebook frontend would: execute requests with
``allow_stdin``, and the kernel's ``input_request`` messages answered on the stdin channel. Each
test stops its pool at the end and asserts that no process is left behind.
"""
from __future__ import annotations

import re
import time
from typing import Iterator, List

import pytest

from support.kernels import Kernel, Reply, magics_kernel, parse_status_pids, plain
from support.processes import wait_gone

pytestmark = pytest.mark.timeout(300)
POOL = "%%fabric --devices 2 --accelerator cpu --strategy ddp"


def leftovers(kernel: Kernel) -> List[int]:
    """Living descendants of the kernel that are not multiprocessing's own helpers."""
    return [p.pid for p in kernel.ranks()]


def running_pids(kernel: Kernel) -> "dict[int, int]":
    """``{rank: pid}`` of the pool, which must be running."""
    status = kernel.ok("%fabric status").stdout
    assert ": running" in status, status
    return parse_status_pids(status)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    """A kernel whose cells may ask for input, as in a notebook (``allow_stdin``)."""
    with magics_kernel(allow_stdin=True) as k:
        yield k


@pytest.fixture
def pool(kernel: Kernel) -> Iterator[Kernel]:
    """A fresh 2-rank pool for the test; stopped afterwards, and nothing may survive it."""
    kernel.ok(f"{POOL}\nimport torch")
    pids = list(parse_status_pids(kernel.ok("%fabric status").stdout).values())
    assert len(pids) == 2
    yield kernel
    kernel.ok("%fabric stop")
    assert wait_gone(pids) == []
    assert leftovers(kernel) == []


def test_breakpoint_on_rank_1_print_next_continue(pool: Kernel) -> None:
    """``p`` of a local, ``n``, ``c``; rank 0 waits in its all_reduce, shown as waiting for the
    debugger (never as a stall, though the stall threshold and the timeout pass meanwhile)."""
    cell = (f"{POOL} --stall 1 --timeout 4\n"
            "x = 10 * (fabric.global_rank + 1)\n"
            "if fabric.global_rank == 1:\n"
            "    breakpoint()\n"
            "    print('stepped over', x)\n"
            "    y = x + 1\n"
            "total = fabric.all_reduce(torch.tensor([float(x)]), reduce_op='sum')\n"
            "total.item()")
    msg = pool.send(cell)
    sent = time.monotonic()
    assert pool.prompt() == "(Pdb rank 1) "
    pool.answer("p x")
    assert pool.prompt() == "(Pdb rank 1) "
    pool.wait_for_output(msg, "[rank 1] 20")
    deadline = time.monotonic() + 30
    while True:  # rank 0 reaches its all_reduce meanwhile; say so at the next prompt
        time.sleep(1.0)  # past --stall 1; and 5 prompts past --timeout 4
        pool.answer("p x")
        assert pool.prompt() == "(Pdb rank 1) "
        try:
            pool.wait_for_output(msg, "rank 0 waits for rank 1 (in the debugger) in all_reduce #1 (float32[1])",
                                 timeout=0.5)
            break
        except TimeoutError:
            shown = pool.output_so_far(msg)
            assert time.monotonic() < deadline, f"rank 0 was never shown as waiting for the debugger:\n{shown}"
    time.sleep(max(1.5, 5.0 - (time.monotonic() - sent)))  # the cell has now run past --timeout 4
    pool.answer("n")
    assert pool.prompt() == "(Pdb rank 1) "
    pool.answer("n")
    assert pool.prompt() == "(Pdb rank 1) "
    pool.answer("p y")
    assert pool.prompt() == "(Pdb rank 1) "
    pool.answer("c")
    reply = pool.collect(msg)
    assert reply.status == "ok", reply.all_text
    assert reply.result == "[ranks 0-1] 30.0"
    text = plain(reply.stdout)
    assert "[rank 1] -> print('stepped over', x)" in text  # where it stopped, though the cell shows rank 0 only
    assert "[rank 1] stepped over 20" in text  # what it printed while stepping
    assert "[rank 1] 21" in text  # p y after n
    assert "[rank 1] -> total = fabric.all_reduce" in text
    assert "stall" not in reply.all_text and "timeout" not in reply.all_text, reply.all_text


def test_two_ranks_at_a_breakpoint_are_served_in_rank_order(pool: Kernel) -> None:
    msg = pool.send("%%fabric\nwho = f'rank {fabric.global_rank}'\n"
                    "fabric.barrier()\nbreakpoint()\nfabric.barrier()\nwho")
    prompts = pool.answer_each(("p who", "c", "where", "c"))
    reply = pool.collect(msg)
    assert reply.status == "ok", reply.all_text
    assert prompts == ["(Pdb rank 0) ", "(Pdb rank 0) ", "(Pdb rank 1) ", "(Pdb rank 1) "]
    text = plain(reply.stdout)
    assert "[rank 0] 'rank 0'" in text
    assert "[rank 1] > <fabric-cell-" in text and "ipykernel" not in text, text  # the stack starts at the cell
    assert "rank 0 is in the debugger; rank 1 waits their turn" in reply.stdout  # an informational notice: not painted red
    assert reply.result == "[rank 0] 'rank 0'\n[rank 1] 'rank 1'"


def test_fabric_debug_opens_the_failing_frame_with_its_locals(pool: Kernel) -> None:
    failing = pool.run("%%fabric\n"
                       "def train_step(scale):\n"
                       "    loss = torch.tensor(2.0) * scale\n"
                       "    if fabric.global_rank == 1:\n"
                       "        raise ValueError(f'loss exploded: {loss.item()}')\n"
                       "    return loss\n"
                       "train_step(3.0)")
    assert failing.ename == "ValueError", failing.all_text
    before = running_pids(pool)
    msg = pool.send("%fabric debug")
    assert pool.prompt() == "(Pdb rank 1) "
    pool.answer("p scale, loss")
    assert pool.prompt() == "(Pdb rank 1) "
    pool.answer("c")
    reply = pool.collect(msg)
    assert reply.status == "ok", reply.all_text
    text = plain(reply.stdout)
    assert "[rank 1] post-mortem of ValueError: loss exploded: 6.0" in text
    assert "-> raise ValueError(f'loss exploded: {loss.item()}')" in text
    assert "[rank 1] (3.0, tensor(6.))" in text
    assert "left the debugger on rank 1" in text
    assert running_pids(pool) == before  # the pool stayed
    assert pool.ok("%%fabric\nfabric.global_rank").result == "[rank 0] 0\n[rank 1] 1"
    assert "rank 0 has no failure to debug" in pool.ok("%fabric debug --rank 0").stdout


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_input_and_breakpoint_in_a_rank_under_every_start_method(kernel: Kernel, method: str) -> None:
    msg = kernel.send(f"{POOL} --start-method {method}\n"
                      "name = input('your name: ') if fabric.global_rank == 1 else 'rank zero'\n"
                      "name.upper()")
    assert kernel.prompt(timeout=120) == "[rank 1] your name: "
    kernel.answer("ada")
    reply = kernel.collect(msg)
    assert reply.status == "ok", reply.all_text
    assert reply.result == "[rank 0] 'RANK ZERO'\n[rank 1] 'ADA'"
    msg = kernel.send("%%fabric\nif fabric.global_rank == 1:\n    breakpoint()\n    shout = name * 2\nname")
    assert kernel.prompt() == "(Pdb rank 1) "
    kernel.answer("p name")
    assert kernel.prompt() == "(Pdb rank 1) "
    kernel.answer("c")
    reply = kernel.collect(msg)
    assert reply.status == "ok", reply.all_text
    text = plain(reply.stdout)
    assert "[rank 1] -> shout = name * 2" in text and "[rank 1] 'ada'" in text  # cell source shown under any method
    pids = list(parse_status_pids(kernel.ok("%fabric status").stdout).values())
    kernel.ok("%fabric stop")
    assert wait_gone(pids) == [] and leftovers(kernel) == []


def test_interrupt_at_the_prompt_leaves_the_debugger_and_keeps_the_pool(pool: Kernel) -> None:
    before = running_pids(pool)
    msg = pool.send("%%fabric\nif fabric.global_rank == 1:\n    breakpoint()\n    after = 1\n'done'")
    assert pool.prompt() == "(Pdb rank 1) "
    status = pool.run_in_subshell("%fabric status").stdout  # a kernel subshell answers meanwhile
    assert re.search(r"^1\s+\d+\s+in the debugger", status, re.M), status
    pool.interrupt()
    interrupted = time.monotonic()
    reply = pool.collect(msg, timeout=60)
    assert time.monotonic() - interrupted < 30
    assert reply.ename == "KeyboardInterrupt", reply.all_text
    assert "rank 1 stopped with KeyboardInterrupt" in reply.error_text
    assert "The pool is still running" in reply.error_text
    assert running_pids(pool) == before
    assert pool.ok("%%fabric\nfabric.global_rank").result == "[rank 0] 0\n[rank 1] 1"  # no prompt left over


def test_no_stdin_is_a_clear_error_not_a_hang(pool: Kernel) -> None:
    before = running_pids(pool)
    started = time.monotonic()
    msg = pool.send("%%fabric\nif fabric.global_rank == 1:\n    breakpoint()\n'unreached'", allow_stdin=False)
    reply: Reply = pool.collect(msg, timeout=60)
    assert time.monotonic() - started < 30
    assert reply.ename == "StdinUnavailableError", reply.all_text
    assert "the debugger on rank 1 waits for a line from the notebook" in reply.error_text
    assert "does not answer input requests" in reply.error_text
    assert "The pool is still running" in reply.error_text
    assert running_pids(pool) == before
    assert pool.ok("%%fabric\nfabric.global_rank").result == "[rank 0] 0\n[rank 1] 1"


def test_launch_post_mortem_opens_the_failing_frame_before_ranks_stop(kernel: Kernel) -> None:
    kernel.ok("from notebook_fabric import launch\n"
              "def failing(fabric):\n"
              "    scale = 7 + fabric.global_rank\n"
              "    if fabric.global_rank == 1:\n"
              "        raise ValueError('bad scale')\n"
              "    return scale")
    msg = kernel.send("launch(failing, accelerator='cpu', devices=2, post_mortem=True)")
    assert kernel.prompt(timeout=120) == "(Pdb rank 1) "
    kernel.answer("p scale")
    assert kernel.prompt() == "(Pdb rank 1) "
    kernel.answer("c")
    reply = kernel.collect(msg)
    assert reply.ename == "ValueError", reply.all_text
    text = plain(reply.stdout)
    assert "[rank 1] post-mortem of ValueError: bad scale" in text and "[rank 1] 8" in text
    assert wait_gone(leftovers(kernel)) == []


def test_a_rank_stepping_into_a_collective_hands_over_to_the_rank_it_waits_for(pool: Kernel) -> None:
    """Rank 0 steps (``n``) into an all_reduce that needs rank 1, still at its prompt: rank 1 is
    served meanwhile, and rank 0 gets its prompt back once the all_reduce is through."""
    msg = pool.send("%%fabric\nfabric.barrier()\nbreakpoint()\n"
                    "t = fabric.all_reduce(torch.tensor([1.0]), reduce_op='sum')\nt.item()")
    prompts = pool.answer_each(("n", "c", "p t", "c"))
    reply = pool.collect(msg)
    assert reply.status == "ok", reply.all_text
    assert prompts == ["(Pdb rank 0) ", "(Pdb rank 1) ", "(Pdb rank 0) ", "(Pdb rank 0) "]
    assert "[rank 0] tensor([2.])" in plain(reply.stdout)
    assert reply.result == "[ranks 0-1] 2.0"


def test_a_notebook_run_by_nbclient_fails_clearly_at_a_breakpoint(tmp_path) -> None:
    """nbclient answers no input requests: the cell fails with StdinUnavailableError, in seconds,
    the pool survives it, and no rank outlives the kernel."""
    import os
    import sys

    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext notebook_fabric"),
        nbformat.v4.new_code_cell(f"{POOL}\nif fabric.global_rank == 1:\n    breakpoint()\n'unreached'"),
        nbformat.v4.new_code_cell("%fabric status"),
    ])
    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    client = NotebookClient(nb, km=km, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    ranks: List[int] = []
    try:
        started = time.monotonic()
        client.execute()
        assert time.monotonic() - started < 90
        error = [o for o in nb.cells[1].outputs if o["output_type"] == "error"]
        assert error and error[0]["ename"] == "StdinUnavailableError", nb.cells[1].outputs
        assert "does not answer input requests" in plain("\n".join(error[0]["traceback"]))
        status = "".join(o.get("text", "") for o in nb.cells[2].outputs)
        ranks = list(parse_status_pids(status).values())
        assert len(ranks) == 2 and ": running" in status, nb.cells[1].outputs  # the pool survived the failed cell
    finally:
        if km.is_alive():  # nbclient leaves a kernel it was handed running
            km.shutdown_kernel(now=False)
    assert wait_gone(ranks) == []  # the ranks end with the kernel


def test_interrupting_fabric_debug_keeps_the_failure_to_debug_again(pool: Kernel) -> None:
    failing = pool.run("%%fabric\nif fabric.global_rank == 0:\n    depth = 3\n    raise KeyError('missing')")
    assert failing.ename == "KeyError", failing.all_text
    before = running_pids(pool)
    msg = pool.send("%fabric debug")
    assert pool.prompt() == "(Pdb rank 0) "
    pool.interrupt()
    assert pool.collect(msg, timeout=60).ename == "KeyboardInterrupt"
    assert running_pids(pool) == before
    msg = pool.send("%fabric debug")  # the same failure, not the interrupt of the first session
    assert pool.prompt() == "(Pdb rank 0) "
    pool.answer("p depth")
    assert pool.prompt() == "(Pdb rank 0) "
    pool.answer("q")
    reply = pool.collect(msg)
    assert reply.status == "ok", reply.all_text
    assert "[rank 0] post-mortem of KeyError: 'missing'" in plain(reply.stdout)
    assert "[rank 0] 3" in plain(reply.stdout)
