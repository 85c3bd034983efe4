"""Tensor arguments of ``fabric.launch(fn, ...)`` under spawn and forkserver reach the ranks in shared
memory (a rank's write is seen by its peers and, after the launch, by the caller); the parameters and
buffers of modules among them are copies, tied weights stay tied; fork shares nothing. Real ranks on 2
CPU processes; afterwards no rank, no file in /dev/shm and no descriptor of the shared memory is left."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from typing import Any, Dict, List, Set

import pytest
import torch
from torch import nn

from support.processes import wait_no_children
from support.script_env import script_environment
from notebook_fabric import Fabric

pytestmark = pytest.mark.timeout(120)


class TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.tied_layer = nn.Linear(2, 2)
        self.tied_layer.weight = self.layer.weight
        self.register_buffer("buffer", torch.ones(3))


def shared_memory_descriptors() -> List[str]:
    """This process' open descriptors of torch's shared memory (unlinked ``/dev/shm/torch_*`` files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/torch_"):
            found.append(target)
    return found


@pytest.fixture
def nothing_left_behind(clean_environment):
    """No rank, no new torch file in /dev/shm, and (once the test dropped its tensors) no shared-memory
    descriptor. (Only torch's files: other processes on this machine create their own there.)"""
    files_before = torch_shared_memory_files()
    descriptors_before = len(shared_memory_descriptors())
    yield
    gc.collect()
    assert wait_no_children() == []
    assert torch_shared_memory_files() - files_before == set()
    assert len(shared_memory_descriptors()) == descriptors_before


def torch_shared_memory_files() -> Set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("torch_")}


def inspect_and_write(fabric: Fabric, tensor: torch.Tensor, model: TiedModel, data: Dict[str, Any],
                      tail: torch.Tensor) -> Dict[str, Any]:
    """Report what is shared here, write this rank's slot of each argument, and read the peer's slot."""
    rank = fabric.global_rank
    seen = {
        "tensor": tensor.is_shared(), "dict": data["weights"].is_shared(), "list": data["steps"][0].is_shared(),
        "weight": model.layer.weight.is_shared(), "tied weight": model.tied_layer.weight.is_shared(),
        "buffer": model.buffer.is_shared(), "bias": model.layer.bias.is_shared(),
        "tied": model.layer.weight.data_ptr() == model.tied_layer.weight.data_ptr(),
        "view": tail.data_ptr() == tensor.data_ptr() + tensor.element_size(),
    }
    tensor[rank] = rank + 1.0
    data["weights"][rank] = 10.0 * (rank + 1)
    data["steps"][0][rank] = 100.0 * (rank + 1)
    with torch.no_grad():
        model.layer.weight.add_(rank + 1.0)
        model.buffer.add_(rank + 1.0)
    fabric.barrier()
    peer = 1 - rank
    seen["peer's write"] = tensor[peer].item() == peer + 1.0 and data["weights"][peer].item() == 10.0 * (peer + 1)
    seen["tied after update"] = torch.equal(model.layer.weight, model.tied_layer.weight)
    fabric.barrier()
    return seen


def arguments():
    tensor = torch.zeros(3)
    return tensor, TiedModel(), {"weights": torch.zeros(2), "steps": [torch.zeros(2)]}, tensor[1:]


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_forkserver"])
def test_tensor_arguments_are_shared_and_module_tensors_are_copies(strategy: str, nothing_left_behind) -> None:
    tensor, model, data, tail = arguments()
    weight_before, buffer_before = model.layer.weight.detach().clone(), model.buffer.clone()
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    seen = fabric.launch(inspect_and_write, tensor, model, data, tail)

    assert seen == {"tensor": True, "dict": True, "list": True, "weight": False, "tied weight": False,
                    "buffer": False, "bias": False, "tied": True, "view": True, "peer's write": True,
                    "tied after update": True}
    # the ranks' writes are in the caller's tensors (now in shared memory here too) ...
    assert tensor.tolist() == [1.0, 2.0, 0.0] and tail.tolist() == [2.0, 0.0] and tensor.is_shared()
    assert data["weights"].tolist() == [10.0, 20.0] and data["steps"][0].tolist() == [100.0, 200.0]
    # ... but each rank updated a model of its own: the caller's is as it was, and not shared
    assert torch.equal(model.layer.weight, weight_before) and torch.equal(model.buffer, buffer_before)
    assert not model.layer.weight.is_shared() and not model.buffer.is_shared()
    assert model.layer.weight is model.tied_layer.weight
    del tensor, tail, data, seen


def test_fork_shares_nothing(nothing_left_behind) -> None:
    """Forked ranks inherit the arguments copy-on-write: nothing is shared, the caller's tensors stay its own."""
    tensor, model, data, tail = arguments()
    seen = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork").launch(inspect_and_write, tensor, model, data, tail)

    assert seen == {"tensor": False, "dict": False, "list": False, "weight": False, "tied weight": False,
                    "buffer": False, "bias": False, "tied": True, "view": True, "peer's write": False,
                    "tied after update": True}
    assert tensor.tolist() == [0.0, 0.0, 0.0] and not tensor.is_shared()
    assert data["weights"].tolist() == [0.0, 0.0]


def closing_over(captured: torch.Tensor):
    def report(fabric: Fabric, argument: torch.Tensor) -> Dict[str, bool]:
        return {"argument": argument.is_shared(), "captured": captured.is_shared()}

    return report  # a nested function: pickled by value, with the tensor it captures


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_only_the_arguments_are_shared(start_method: str, nothing_left_behind) -> None:
    """A tensor the function captures travels with the function, as a copy; keyword arguments are shared."""
    captured, argument = torch.zeros(2), torch.zeros(2)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    seen = fabric.launch(closing_over(captured), argument=argument, start_method=start_method, return_all=True)
    assert seen == [{"argument": True, "captured": False}] * 2
    assert argument.is_shared() and not captured.is_shared()
    del argument


NOT_DUMPABLE = """
import ctypes, torch
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: other processes may not open our descriptors
from notebook_fabric import Fabric

def report(fabric, tensor):
    tensor[fabric.global_rank] = 1.0
    return tensor.is_shared()

tensor = torch.zeros(2)
seen = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(report, tensor, return_all=True, dashboard=False)
print("RESULT", seen, tensor.tolist())
"""


def test_a_process_that_forbids_opening_its_descriptors_sends_copies(tmp_path, nothing_left_behind) -> None:
    """Where the ranks could not open the launcher's descriptors, the arguments are copied (and the launch works)."""
    result = subprocess.run([sys.executable, "-c", NOT_DUMPABLE], capture_output=True, text=True, timeout=90,
                            env=script_environment(str(tmp_path / "marker")))
    assert result.returncode == 0, result.stderr
    assert "RESULT [False, False] [0.0, 0.0]" in result.stdout, result.stdout + result.stderr


READ_PAYLOAD = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"


def test_a_payload_whose_tensor_was_freed_is_refused_not_misread(tmp_path) -> None:
    """A reader of a payload whose tensor is gone here gets a clear error, never another file's bytes:
    the descriptor number, reused by a file opened since, fails the inode check."""
    from notebook_fabric.utilities.shared_tensors import SharedTensors, dumps

    tensor = torch.arange(4.0)
    payload = dumps(SharedTensors(tensor))
    number, _ = tensor.untyped_storage()._share_fd_cpu_()  # the descriptor the payload names
    del tensor
    gc.collect()
    other = os.open(tmp_path / "another-file", os.O_CREAT | os.O_RDWR)
    if other != number:
        os.dup2(other, number)  # another file now has that number
        os.close(other)
    try:
        result = subprocess.run([sys.executable, "-c", READ_PAYLOAD], input=payload, capture_output=True, timeout=60)
    finally:
        os.close(number)
    assert result.returncode != 0
    assert b"was freed there before this rank opened it" in result.stderr, result.stderr
