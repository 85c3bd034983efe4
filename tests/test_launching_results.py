"""launch(fn): values come back, under fork, spawn and forkserver; output arrives tagged and in order.

Real rank processes, real gloo collectives.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from support.processes import wait_no_children
from notebook_fabric import launch
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric.launching import run_function

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


def sum_of_ranks(fabric, scale, offset=0.0):
    tensor = torch.tensor([float(fabric.global_rank + 1)])
    total = fabric.all_reduce(tensor, reduce_op="sum")
    return {"rank": fabric.global_rank, "world": fabric.world_size, "total": total * scale + offset}


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_values_come_back_from_every_start_method(start_method):
    values = launch(sum_of_ranks, 2.0, accelerator="cpu", devices=2, start_method=start_method, return_all=True)
    assert [v["rank"] for v in values] == [0, 1]
    assert all(v["world"] == 2 for v in values)
    for value in values:
        assert value["total"].device.type == "cpu"
        assert value["total"].tolist() == [6.0]  # (1 + 2) * 2


def test_rank_zero_value_by_default_and_keyword_arguments_through_run_function():
    assert launch(sum_of_ranks, 1.0, accelerator="cpu")["rank"] == 0
    value = run_function({"accelerator": "cpu", "strategy": "ddp", "devices": 2}, sum_of_ranks, (1.0,),
                         {"offset": 10.0}, make_fabric=build_rank_fabric, num_processes=2, start_method="fork")
    assert value["total"].tolist() == [13.0]


def test_fabric_launch_with_a_function_uses_the_launcher():
    from notebook_fabric import Fabric

    fabric = Fabric(accelerator="cpu", strategy="ddp_fork", devices=2)
    assert fabric.launch(sum_of_ranks, 3.0)["total"].tolist() == [9.0]


def test_fork_inherits_objects_that_cannot_be_pickled():
    import threading

    lock = threading.Lock()
    assert launch(lambda fabric, held: type(held).__name__, lock, accelerator="cpu") == "lock"


def talk(fabric):
    import ctypes
    import os

    rank = fabric.global_rank
    for i in range(3):
        print(f"python line {i} of rank {rank}")
    os.system(f"echo shell line of rank {rank}")  # another process writing to the inherited fd
    libc = ctypes.CDLL(None)
    libc.printf(b"C printf of rank %d\n", rank)
    print(f"to stderr from rank {rank}", file=sys.stderr)
    return rank


def test_output_is_captured_at_fd_level_tagged_and_in_order(capsys):
    launch(talk, accelerator="cpu")
    out, err = capsys.readouterr()
    for rank in (0, 1):
        lines = [line for line in out.splitlines() if line.startswith(f"[rank {rank}] ")]
        assert lines == [
            f"[rank {rank}] python line 0 of rank {rank}",
            f"[rank {rank}] python line 1 of rank {rank}",
            f"[rank {rank}] python line 2 of rank {rank}",
            f"[rank {rank}] shell line of rank {rank}",
            f"[rank {rank}] C printf of rank {rank}",
        ]
        assert f"[rank {rank}] to stderr from rank {rank}" in err.splitlines()


def test_functions_and_closures_from_a_script_main_travel_under_spawn_and_forkserver(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import torch
        from notebook_fabric import launch

        class Scaler:
            def __init__(self, factor):
                self.factor = factor

        def make_step(scaler):
            def step(fabric, base):
                return torch.tensor([base * scaler.factor + fabric.global_rank])
            return step

        if __name__ == "__main__":
            step = make_step(Scaler(10))
            for method in ("spawn", "forkserver"):
                values = launch(step, 2, accelerator="cpu", start_method=method, return_all=True)
                print(method, [v.item() for v in values], flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    assert "spawn [20, 21]" in done.stdout
    assert "forkserver [20, 21]" in done.stdout
    assert "Can't get attribute" not in done.stderr


def test_a_script_without_main_guard_works_under_spawn(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("from notebook_fabric import launch\n"
                      "print('value', launch(lambda fabric: fabric.world_size * 7, accelerator='cpu', "
                      "start_method='spawn'), flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("value 14") == 1  # ranks never re-ran the script
