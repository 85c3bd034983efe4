"""Debug mode: a mismatched collective becomes the same clear error on every rank, never a hang."""
import time

import pytest
import torch

from notebook_fabric import launch
from notebook_fabric.collectives import CollectiveMismatchError
from support.processes import wait_no_children


def _different_ops(fabric):
    data = torch.ones(4)
    if fabric.global_rank == 0:
        return fabric.all_reduce(data, reduce_op="sum")
    return fabric.all_gather(data)


def _different_shapes(fabric):
    return fabric.all_reduce(torch.ones(4 + fabric.global_rank), reduce_op="sum")


def _matching_calls(fabric):
    total = fabric.all_reduce(torch.tensor([float(fabric.global_rank)]), reduce_op="sum")
    gathered = fabric.all_gather(torch.tensor([fabric.global_rank]))
    fabric.barrier("end")
    return total.item(), gathered.flatten().tolist(), fabric.broadcast({"from": fabric.global_rank}, src=1)


def _assert_no_children() -> None:
    assert wait_no_children(10) == []  # multiprocessing's own helpers are not leaked ranks


def test_different_ops_raise_the_same_error_naming_ranks_ops_shapes_and_places() -> None:
    started = time.monotonic()
    with pytest.raises(CollectiveMismatchError) as caught:
        launch(_different_ops, devices=2, accelerator="cpu", debug=True)
    message = str(caught.value)
    assert time.monotonic() - started < 30
    assert "rank 0: #1 all_reduce(float32[4]) reduce_op=sum" in message
    assert "rank 1: #1 all_gather(float32[4])" in message
    assert "test_collectives_debug.py" in message and "_different_ops" in message  # the place in the user's code
    assert caught.value.ranks == [0, 1]  # identical on both ranks, so reported once for both
    _assert_no_children()


def test_different_shapes_are_caught_before_the_backend_sees_them() -> None:
    with pytest.raises(CollectiveMismatchError, match=r"rank 1: #1 all_reduce\(float32\[5\]\)"):
        launch(_different_shapes, devices=2, accelerator="cpu", debug=True)
    _assert_no_children()


def test_matching_collectives_give_their_usual_results_in_debug_mode() -> None:
    total, gathered, received = launch(_matching_calls, devices=2, accelerator="cpu", debug=True)
    assert total == 1.0 and gathered == [0, 1] and received == {"from": 1}
