"""notebook_fabric/accelerators: choosing a device family from ``accelerator=``, and parsing ``devices=``.

Real accelerator classes on this machine (CPU; CUDA and MPS only as far as they report themselves
unavailable); a wrong name or a device family this machine lacks fails at ``Fabric(...)``.
"""
from __future__ import annotations

import pytest
import torch

from notebook_fabric import Fabric
from notebook_fabric.accelerators import (CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator,
                                          resolve_accelerator)  # fmt: skip
from notebook_fabric.accelerators.base import parse_count_or_indices
from support.processes import rank_like_children

pytestmark = pytest.mark.usefixtures("clean_environment")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def no_children() -> bool:
    return rank_like_children() == []


@pytest.mark.parametrize("accelerator", ["tpux", "GPU0", "", 3, None])
def test_bad_accelerator(accelerator) -> None:
    with pytest.raises(ValueError, match="accelerator=") as error:
        Fabric(accelerator=accelerator)
    for choice in ("auto", "cpu", "cuda", "gpu", "mps", "tpu"):
        assert repr(choice) in str(error.value)


@needs_no_gpu
@pytest.mark.parametrize("accelerator", ["cuda", "gpu"])
def test_cuda_without_a_gpu(accelerator: str) -> None:
    with pytest.raises(ValueError, match="accelerator='cuda' was requested but no CUDA GPU is visible.*accelerator='cpu'"):
        Fabric(accelerator=accelerator, devices=1)
    assert no_children()


@pytest.mark.parametrize("name, family", [("cpu", CPUAccelerator), ("CPU", CPUAccelerator), ("cuda", CUDAAccelerator),
                                          ("gpu", CUDAAccelerator), ("mps", MPSAccelerator), ("tpu", XLAAccelerator)])
def test_names_resolve_to_their_family(name: str, family: type) -> None:
    accelerator = resolve_accelerator(name)
    assert type(accelerator) is family


def test_an_instance_is_used_as_given_and_auto_picks_the_first_available() -> None:
    mine = CPUAccelerator()
    assert resolve_accelerator(mine) is mine
    expected = next((c for c in (CUDAAccelerator, MPSAccelerator) if c.is_available()), CPUAccelerator)
    assert type(resolve_accelerator("auto")) is expected
    assert type(Fabric(accelerator="auto", devices=1).accelerator) is expected


def test_cpu_devices_are_processes_on_the_one_cpu_device() -> None:
    cpu = CPUAccelerator()
    assert cpu.is_available() and cpu.distributed_backend == "gloo" and cpu.auto_device_count() == 1
    assert cpu.parse_devices("auto") == [0]
    assert cpu.parse_devices(2) == cpu.parse_devices("2") == cpu.parse_devices("0,1") == cpu.parse_devices([0, 1]) == [0, 1]
    assert cpu.get_parallel_devices([0, 1]) == [torch.device("cpu"), torch.device("cpu")]


@pytest.mark.parametrize(
    "devices, parsed",
    [(3, [0, 1, 2]), (-1, [0, 1, 2, 3]), ("-1", [0, 1, 2, 3]), ("auto", [0, 1, 2, 3]), (" 1 ", [0]),
     ("1,3", [1, 3]), ((2, 0), [2, 0]), ([3], [3])],
)
def test_count_or_indices_of_four_devices(devices, parsed: list) -> None:
    assert parse_count_or_indices(devices, available=4, kind="GPU") == parsed


@pytest.mark.parametrize(
    "devices, message",
    [(5, r"devices=5 asks for more GPU devices than this machine has \(4 \(a note\)\)\. Use devices=4 or fewer"),
     (0, r"must be at least 1 \(or -1 / 'auto' for all GPU devices\)"),
     ([1, 4], r"names GPU device\(s\) \[4\] but this machine has 4 \(indices 0\.\.3\)"),
     ([-1], r"names GPU device\(s\) \[-1\]"), ([2, 2], "names a device twice"), ((), "is empty"),
     (False, "is not understood"), ("two", "is not understood"), (2.0, "is not understood")],
)
def test_count_or_indices_refusals_name_the_limit(devices, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_count_or_indices(devices, available=4, kind="GPU", limit_note=" (a note)")
