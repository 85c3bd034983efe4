"""``%%fabric`` and ``%fabric`` driven through a real Jupyter kernel (nothing mocked).

One kernel serves the module (starting one costs seconds); a test that needs a particular pool
asks for it with explicit settings in its first cell (``--devices 2``), which starts or reuses it.
Tests that end the kernel itself are in ``test_magics_lifecycle.py``.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator

import psutil
import pytest

from support.kernels import Kernel, magics_kernel, parse_status_pids
from support.processes import wait_gone
from support.waiting import wait_until

POOL = "%%fabric --devices 2 --accelerator cpu --strategy ddp"


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    with magics_kernel() as k:
        yield k


def pids(kernel: Kernel) -> Dict[int, int]:
    return parse_status_pids(kernel.ok("%fabric status").stdout)


def test_state_persists_across_cells(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\ncounter = fabric.global_rank * 10")
    before = pids(kernel)
    reply = kernel.ok("%%fabric\ncounter += 1\ncounter")
    assert reply.result == "[rank 0] 1\n[rank 1] 11"
    assert kernel.ok("%%fabric\ncounter").result == "[rank 0] 1\n[rank 1] 11"
    assert pids(kernel) == before  # the same processes served every cell
    assert kernel.ok("%%fabric\nfabric.world_size").result == "[ranks 0-1] 2"  # identical values shown once


def test_notebook_variables_are_shipped(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nNone")
    kernel.ok("import torch, math\n"
              "scale = 3\n"
              "cfg = {'n': 4}\n"
              "t = torch.arange(3.0)\n"
              "class Box:\n    def __init__(self, v): self.v = v\n"
              "def add(x):\n    return x + scale + fabric.global_rank\n")  # `fabric`: the rank's, at call time
    reply = kernel.ok("%%fabric\n(add(cfg['n']), t.sum().item(), Box(math.pi).v > 3)")
    assert reply.result == "[rank 0] (7, 3.0, True)\n[rank 1] (8, 3.0, True)"
    kernel.ok("scale = 5\ncfg['n'] = 40\nt.add_(1)")  # rebinding, in-place dict and tensor changes travel
    assert kernel.ok("%%fabric\n(add(cfg['n']), t.sum().item())").result == "[rank 0] (45, 6.0)\n[rank 1] (46, 6.0)"
    # a value the ranks bound themselves is not overwritten by the notebook's older one...
    kernel.ok("%%fabric\nscale = 100 + fabric.global_rank")
    assert kernel.ok("%%fabric\nscale").result == "[rank 0] 100\n[rank 1] 101"
    # ...until the notebook assigns it again (the latest assignment wins)
    kernel.ok("scale = 7")
    assert kernel.ok("%%fabric\nscale").result == "[ranks 0-1] 7"
    assert kernel.ok("%%fabric\nadd(0)").result == "[rank 0] 7\n[rank 1] 8"


def test_unpicklable_variable_is_named_and_pool_unaffected(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nNone")
    before = pids(kernel)
    kernel.ok("import threading\nlock = threading.Lock()")
    reply = kernel.run("%%fabric\nwith lock:\n    pass")
    assert reply.ename == "UnpicklableVariableError"
    assert "'lock'" in reply.evalue and "_thread.lock" in reply.evalue
    assert "Traceback" not in reply.error_text  # a clear message, not the notebook's stack
    assert kernel.ok("%%fabric\n2 + 2").result == "[ranks 0-1] 4"
    assert pids(kernel) == before


def test_out_and_out_all(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nNone")
    kernel.ok("%%fabric --out w\nw = torch.full((2,), float(fabric.global_rank))")
    assert kernel.ok("w.tolist()").result == "[0.0, 0.0]"
    kernel.ok("%%fabric --out-all w\nw = w + 1")
    assert kernel.ok("[v.tolist() for v in w]").result == "[[1.0, 1.0], [2.0, 2.0]]"
    kernel.ok("%%fabric --ranks 1 --out w\nw = w * 10")  # with --ranks: the first rank that ran
    assert kernel.ok("w.tolist()").result == "[20.0, 20.0]"
    # the notebook's copy from --out does not flow back over the ranks' own values
    assert kernel.ok("%%fabric\nw.tolist()").result == "[rank 0] [1.0, 1.0]\n[rank 1] [20.0, 20.0]"
    missing = kernel.run("%%fabric --out nothing_here\nx = 1")
    assert missing.ename == "NameError" and "--out nothing_here" in missing.error_text
    kernel.ok("%fabric pull w --rank 1")
    assert kernel.ok("w.tolist()").result == "[20.0, 20.0]"
    kernel.ok("%fabric pull w --all")
    assert kernel.ok("[v.tolist() for v in w]").result == "[[1.0, 1.0], [20.0, 20.0]]"
    kernel.ok("w = 'from the notebook'")
    kernel.ok("%fabric push w")
    assert kernel.ok("%%fabric\nw").result == "[ranks 0-1] 'from the notebook'"


def test_output_shows_rank_zero_unless_asked(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nNone")
    code = "import sys\nprint('out', fabric.global_rank)\nprint('err', fabric.global_rank, file=sys.stderr)"
    default = kernel.ok(f"%%fabric\n{code}")
    assert "[rank 0] out 0" in default.stdout and "[rank 0] err 0" in default.stderr
    assert "[rank 1]" not in default.all_text
    every = kernel.ok(f"%%fabric --show all\n{code}")
    assert "[rank 0] out 0" in every.stdout and "[rank 1] out 1" in every.stdout and "[rank 1] err 1" in every.stderr
    one = kernel.ok(f"%%fabric --show 1\n{code}")
    assert "[rank 1] out 1" in one.stdout and "[rank 0]" not in one.all_text
    assert kernel.ok("%%fabric\n7;").result == ""  # a trailing semicolon hides the value, as in IPython


def test_output_is_live_while_the_cell_runs(kernel: Kernel, tmp_path) -> None:
    go = tmp_path / "go"
    kernel.ok(f"{POOL}\nimport os, time\ngo_file = {str(go)!r}")
    # rank 0 prints, then waits for a file that the test creates only after it has seen the print:
    # if output were held until the cell ends, this would never finish
    msg = kernel.send("%%fabric\nprint('waiting for go', flush=True)\nwhile not os.path.exists(go_file):\n"
                      "    time.sleep(0.05)\nprint('went')")
    kernel.wait_for_output(msg, "[rank 0] waiting for go", timeout=30)
    go.write_text("go")
    reply = kernel.collect(msg, timeout=30)
    assert reply.status == "ok" and reply.stdout.index("waiting for go") < reply.stdout.index("went")


def test_python_errors_show_per_rank_and_pool_survives(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nkept = 'yes'")
    before = pids(kernel)
    reply = kernel.run("%%fabric\nvalue = 10\nif fabric.global_rank == 1:\n    raise ValueError('only on one')\n"
                       "value / (fabric.global_rank - 0)")
    assert reply.ename in ("ZeroDivisionError", "ValueError")
    text = reply.error_text
    assert "--- rank 0:" in text and "--- rank 1:" in text  # both ranks' tracebacks
    assert re.search(r'File "<fabric-cell-\d+>", line 5, in <module>\n\s+value / \(fabric.global_rank - 0\)', text)
    assert re.search(r'File "<fabric-cell-\d+>", line 4, in <module>\n\s+raise ValueError', text)
    assert "cell_task.py" not in text  # the magic's own frames are not shown
    assert "The pool is still running" in text
    assert kernel.ok("%%fabric\nkept").result == "[ranks 0-1] 'yes'"
    assert pids(kernel) == before
    syntax = kernel.run("%%fabric\nx = (")
    assert syntax.ename == "SyntaxError" and pids(kernel) == before


def test_interrupt_raises_in_ranks_and_pool_survives(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport time\nkept = 'still here'")
    before = pids(kernel)
    msg = kernel.send("%%fabric\nprint('looping', flush=True)\nfor _ in range(600):\n    time.sleep(0.05)")
    kernel.wait_for_output(msg, "[rank 0] looping")
    kernel.interrupt()
    reply = kernel.collect(msg, timeout=60)
    assert reply.ename == "KeyboardInterrupt"
    assert "ranks 0-1 stopped with KeyboardInterrupt" in reply.error_text
    assert re.search(r'rank 0 interrupted at File "<fabric-cell-\d+>", line 4', reply.stderr)
    assert "The pool is still running" in reply.error_text
    assert kernel.ok("%%fabric\nkept").result == "[ranks 0-1] 'still here'"
    assert pids(kernel) == before
    assert "At the last interrupt" in kernel.ok("%fabric where").stdout


def test_second_interrupt_ends_stuck_ranks_and_next_cell_restarts(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport time")
    before = pids(kernel)
    # rank 0 waits in a barrier (native code: KeyboardInterrupt cannot reach it), rank 1 sleeps
    msg = kernel.send("%%fabric --stall 0\nprint('in', flush=True)\nif fabric.global_rank == 0:\n"
                      "    fabric.barrier('stuck')\nelse:\n    time.sleep(60)")
    kernel.wait_for_output(msg, "[rank 0] in")
    wait_until(lambda: re.search(r"^0\s+\d+\s+in barrier", kernel.status(), re.M), 30,
               "%fabric status to show rank 0 in the barrier", describe=kernel.status)
    kernel.interrupt()
    # the first interrupt reached the ranks: rank 1 stopped, rank 0 stays in gloo's barrier
    kernel.wait_for_output(msg, "rank 1 interrupted")
    kernel.interrupt()
    reply = kernel.collect(msg, timeout=60)
    assert reply.ename == "KeyboardInterrupt"
    assert "The pool was stopped" in reply.error_text
    assert "rank 0 did not stop within 3 s (or the kernel was interrupted twice) and was terminated" in reply.error_text
    assert not wait_gone(list(before.values()))
    restarted = kernel.ok("%%fabric\nfabric.global_rank")
    assert "the previous pool ended (it was stopped after an interrupt)" in restarted.stderr
    assert restarted.result == "[rank 0] 0\n[rank 1] 1"


def test_killed_rank_is_reported_and_pool_restarted(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport os, signal")
    victim = pids(kernel)[1]
    kernel.ok(f"import os, signal\nos.kill({victim}, signal.SIGKILL)")  # from a plain cell, pid from %fabric status
    wait_until(lambda: "exited" in kernel.ok("%fabric status").stdout, 10, "%fabric status to show rank 1 exited")
    reply = kernel.ok("%%fabric\nfabric.global_rank")
    assert "the previous pool ended (rank 1 killed by signal SIGKILL" in reply.stderr
    assert reply.result == "[rank 0] 0\n[rank 1] 1"
    assert victim not in pids(kernel).values()
    # a rank dying while a cell runs: reported with the rank and the signal, the others stopped
    before = pids(kernel)
    died = kernel.run("%%fabric\nimport os, signal\nif fabric.global_rank == 1:\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)\nfabric.barrier()")
    assert died.ename == "RankDiedError", died.all_text
    assert "rank 1 killed by signal SIGKILL" in died.error_text and "The pool was stopped" in died.error_text
    assert not wait_gone(list(before.values()))
    assert kernel.ok("%%fabric\n'back'").result == "[ranks 0-1] 'back'"


def test_where_while_a_cell_blocks_in_a_barrier(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport time")
    # rank 0 waits in the barrier until rank 1 has slept; the cell then finishes by itself
    msg = kernel.send("%%fabric --stall 1\nif fabric.global_rank == 1:\n    time.sleep(5)\n"
                      "fabric.barrier('meet')\nprint('met')")
    wait_until(lambda: "in barrier" in kernel.status(), 10, "%fabric status to show rank 0 in the barrier",
               describe=kernel.status)
    where = kernel.run_in_subshell("%fabric where")  # a kernel subshell answers while the cell runs
    assert where.status == "ok"
    rank0, rank1 = where.stdout.split("rank 1:")
    assert "in barrier #" in rank0 and "name='meet'" in rank0 and "fabric.barrier('meet')" in rank0
    assert "time.sleep(5)" in rank1
    reply = kernel.collect(msg, timeout=60)
    assert reply.status == "ok" and "[rank 0] met" in reply.stdout
    # the stall watchdog reported the same inside the cell, and %fabric where keeps it
    assert "stall: rank 0 has waited in barrier" in reply.stderr and "time.sleep(5)" in reply.stderr
    assert "At the last stall" in kernel.ok("%fabric where").stdout


def test_timeout_reports_where_ranks_wait(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport time")
    reply = kernel.run("%%fabric --timeout 2 --stall 0\nif fabric.global_rank == 1:\n    fabric.barrier('late')\n"
                       "else:\n    time.sleep(30)")
    assert reply.ename == "LaunchTimeoutError"
    assert "rank 1 waits in barrier" in reply.error_text and "time.sleep(30)" in reply.error_text
    assert kernel.ok("%%fabric\n1").result == "[ranks 0-1] 1"  # usable again (restarted if it had to be)


def test_subset_runs_and_refused_collectives(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nimport torch\nimport torch.distributed as dist\nmine = fabric.global_rank")
    before = pids(kernel)
    assert kernel.ok("%%fabric --ranks 1\nmine * 100").result == "[rank 1] 100"
    kernel.ok("%%fabric --ranks 0\nmine = 'changed on 0'")
    assert kernel.ok("%%fabric\nmine").result == "[rank 0] 'changed on 0'\n[rank 1] 1"
    for call in ("fabric.all_reduce(torch.ones(1))", "fabric.barrier()", "dist.all_reduce(torch.ones(1))"):
        reply = kernel.run(f"%%fabric --ranks 0\n{call}")
        assert reply.ename == "SubsetCollectiveError", reply.all_text
        assert "rank 1 is not running it" in reply.error_text
    assert kernel.ok("%%fabric\nfabric.all_reduce(torch.ones(1), reduce_op='sum')").result == "[ranks 0-1] tensor([2.])"
    assert pids(kernel) == before
    bad = kernel.run("%%fabric --ranks 5\n1")
    assert "UsageError" in bad.stderr and "not in this pool of 2 ranks" in bad.stderr


def test_changed_settings_restart_the_pool(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nNone")
    before = pids(kernel)
    reply = kernel.ok("%%fabric --devices 3\nfabric.world_size")
    assert "settings changed (devices 2 -> 3); restarting the pool" in reply.stderr
    assert reply.result == "[ranks 0-2] 3"
    assert not wait_gone(list(before.values()))
    same = kernel.ok("%%fabric\nfabric.world_size")  # options left out keep the running pool
    assert same.result == "[ranks 0-2] 3" and "restarting" not in same.stderr
    kernel.ok("def twice(v):\n    return 2 * v\n")  # a notebook function, sent with cloudpickle under spawn
    spawned = kernel.ok("%%fabric --devices 2 --start-method spawn\ntwice(fabric.global_rank)")
    assert "settings changed (devices 3 -> 2, start_method None -> 'spawn')" in spawned.stderr
    assert spawned.result == "[rank 0] 0\n[rank 1] 2"


def test_stop_leaves_no_process(kernel: Kernel) -> None:
    kernel.ok(f"{POOL}\nNone")
    ranks = list(pids(kernel).values())
    assert kernel.ok("%fabric stop").stdout.strip() == "stopped the pool (2 ranks)"
    assert not wait_gone(ranks)
    assert not [p for p in kernel.children() if p.status() != psutil.STATUS_ZOMBIE]
    assert "no pool is running" in kernel.ok("%fabric status").stdout
    restarted = kernel.ok("%fabric restart")
    assert "restarted the pool" in restarted.stdout and len(pids(kernel)) == 2


def test_debug_mode_turns_a_mismatched_collective_into_an_error_and_the_pool_survives(kernel: Kernel) -> None:
    kernel.ok(f"{POOL} --debug\nimport torch")
    before = pids(kernel)
    reply = kernel.run("%%fabric\nif fabric.global_rank == 0:\n    fabric.all_reduce(torch.ones(3))\n"
                       "else:\n    fabric.broadcast(torch.ones(2), src=0)")
    assert reply.ename == "CollectiveMismatchError"
    text = reply.error_text
    assert "rank 0: #1 all_reduce(float32[3]) reduce_op=mean" in text
    assert "rank 1: #1 broadcast(float32[2]) src=0" in text
    assert re.search(r"<fabric-cell-\d+>:3", text) and re.search(r"<fabric-cell-\d+>:5", text)  # the cell's lines
    assert kernel.ok("%%fabric\nfabric.all_reduce(torch.ones(1), reduce_op='sum')").result == "[ranks 0-1] tensor([2.])"
    assert pids(kernel) == before  # nobody was left inside a collective: the same pool goes on
