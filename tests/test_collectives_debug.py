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


# -- barriers: torch's monitored_barrier names the rank that did not come -------------------------
def _barrier_skipped(fabric, skipper, then_wait_forever):
    fabric.all_reduce(torch.ones(2))
    if fabric.global_rank != skipper:
        fabric.barrier("epoch-end")
    elif then_wait_forever:
        while True:  # still running, in no collective: only the barrier's own check can tell
            time.sleep(0.05)
    return fabric.global_rank


def test_a_rank_missing_from_a_barrier_is_named_by_torchs_monitored_barrier(monkeypatch) -> None:
    from notebook_fabric.collectives.debug import BARRIER_TIMEOUT_VARIABLE, BarrierMissedError

    monkeypatch.setenv(BARRIER_TIMEOUT_VARIABLE, "2")
    with pytest.raises(BarrierMissedError) as caught:  # rank 1 never ends: only the finding can stop the run
        launch(_barrier_skipped, 1, True, devices=2, accelerator="cpu", debug=True, stall=600.0, timeout=600.0)
    message = str(caught.value)
    assert "barrier #2 (name='epoch-end')" in message and "rank 1 did not arrive" in message
    assert "torch's monitored_barrier reported: [Rank 0]: Ranks 1 failed to pass monitoredBarrier" in message
    assert 'test_collectives_debug.py' in message and 'fabric.barrier("epoch-end")' in message  # the user's line
    assert caught.value.missing == [1]
    _assert_no_children()


def test_the_monitoring_rank_missing_from_a_barrier_is_named_on_the_others(monkeypatch) -> None:
    from notebook_fabric.collectives.debug import BARRIER_TIMEOUT_VARIABLE, BarrierMissedError

    monkeypatch.setenv(BARRIER_TIMEOUT_VARIABLE, "2")
    with pytest.raises(BarrierMissedError) as caught:  # rank 0, which torch's check reports to, skips it
        launch(_barrier_skipped, 0, False, devices=4, accelerator="cpu", debug=True, stall=600.0, timeout=600.0)
    message = str(caught.value)
    assert "rank 0 did not arrive" in message and "from rank 0" in message
    assert 'fabric.barrier("epoch-end")' in message
    assert caught.value.missing == [0]
    _assert_no_children()


def _barrier_against_all_reduce(fabric):
    if fabric.global_rank == 0:
        fabric.barrier("b")
    else:
        fabric.all_reduce(torch.ones(2))


def test_a_barrier_against_another_collective_names_both_calls(monkeypatch) -> None:
    from notebook_fabric.collectives.debug import BARRIER_TIMEOUT_VARIABLE, BarrierMissedError

    monkeypatch.setenv(BARRIER_TIMEOUT_VARIABLE, "2")
    with pytest.raises(BarrierMissedError) as caught:
        launch(_barrier_against_all_reduce, devices=2, accelerator="cpu", debug=True, stall=600.0, timeout=600.0)
    message, notes = str(caught.value), "\n".join(getattr(caught.value, "__notes__", []))
    assert "barrier #1 (name='b')" in message and "rank 1 did not arrive" in message
    assert 'fabric.barrier("b")' in message
    assert "rank 1: CollectiveMismatchError: #1 all_reduce(float32[2])" in notes
    assert "fabric.all_reduce(torch.ones(2))" in notes
    _assert_no_children()
