"""Certain hangs reported at once, the collective ledger, and stall reports that see torch's own collectives.

Real ranks, real gloo collectives, real DDP/FSDP. "At once" is asserted against a stall threshold
and a timeout set far larger (60 s / 120 s): the error must come long before either could fire.
"""
from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from support.processes import wait_no_children
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric import launch
from notebook_fabric.collectives import CollectiveMismatchError, last_ledger
from notebook_fabric.launching.errors import LaunchTimeoutError
from notebook_fabric.launching.hang import CollectiveHangError
from notebook_fabric.launching.pool import RankPool

pytestmark = pytest.mark.timeout(180)

PATIENT = {"stall": 60.0, "timeout": 120.0}  # far beyond what the tests allow themselves
AT_ONCE = 20.0  # seconds: generous for a loaded machine, still far below the threshold and the timeout


def _assert_no_children() -> None:
    assert wait_no_children(15.0) == []


def _internal_all_reduces(entries) -> list:
    return [e for e in entries if e.origin == "torch" and e.op == "all_reduce"]


# -- rank functions ------------------------------------------------------------------------------
def _save_on_rank_zero(fabric, path):
    model = nn.Linear(4, 2)
    fabric.all_reduce(torch.ones(3), reduce_op="sum")
    if fabric.is_global_zero:
        fabric.save(path, {"model": model})
    return "saved"


def _ddp_uneven_steps(fabric, ns=None):
    model = fabric.setup(nn.Linear(4, 3))
    steps = 3 + (1 if fabric.global_rank == 0 else 0)  # uneven data: rank 0 has one batch more
    for _ in range(steps):
        loss = model(torch.ones(2, 4)).sum()
        fabric.backward(loss)
    return steps


def _barrier_skipped_by_rank_zero(fabric, ns):
    fabric.all_reduce(torch.ones(2))
    if fabric.global_rank != 0:
        fabric.barrier("epoch-end")
    return fabric.global_rank


def _ddp_step(fabric, ns):
    if "model" not in ns:
        ns["model"] = fabric.setup(nn.Linear(4, 3))
    model = ns["model"]
    fabric.backward(model(torch.ones(2, 4)).sum())
    return "stepped"


def _fsdp_rank_one_skips_a_forward(fabric):
    model = fabric.setup(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    for step in range(3):
        if fabric.global_rank == 1 and step == 2:
            continue  # skips the last forward (and backward)
        loss = model(torch.ones(2, 4)).sum()
        fabric.backward(loss)
    return "done"


def _ddp_then_endless_loop_on_rank_one(fabric):
    model = fabric.setup(nn.Linear(4, 3))
    fabric.backward(model(torch.ones(2, 4)).sum())
    loss = model(torch.ones(2, 4)).sum()  # the second forward: both ranks
    if fabric.global_rank == 1:
        spins = 0
        while True:  # never reaches the second backward
            spins += 1
    fabric.backward(loss)


def _ddp_then_mismatch(fabric, what):
    model = fabric.setup(nn.Linear(4, 3))
    fabric.backward(model(torch.ones(2, 4)).sum())
    rank = fabric.global_rank
    if what == "shape":
        return fabric.all_reduce(torch.ones(4 + rank % 2), reduce_op="sum")
    if what == "dtype":
        return fabric.all_reduce(torch.ones(4, dtype=torch.float64 if rank % 2 else torch.float32), reduce_op="sum")
    return fabric.broadcast(torch.ones(2), src=rank % 2)  # "src": the ranks disagree on the source


# -- certain hangs -------------------------------------------------------------------------------
def test_save_under_is_global_zero_in_launch_is_reported_at_once(tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(CollectiveHangError) as caught:
        launch(_save_on_rank_zero, str(tmp_path / "ckpt.pt"), devices=2, accelerator="cpu", **PATIENT)
    assert time.monotonic() - started < AT_ONCE
    message = str(caught.value)
    assert "rank 0 waits in barrier #2 (name='save_checkpoint')" in message
    assert 'fabric.save(path, {"model": model})' in message and "test_collectives_hangs.py" in message
    assert "rank 1 finished the function without calling it" in message
    assert "all_reduce #1 (float32[3], reduce_op=sum)" in message  # what rank 1 did instead
    assert "`if fabric.is_global_zero:`" in message and "every rank must call it" in message
    assert caught.value.ranks == [0]
    table = str(last_ledger())
    assert re.search(r">> world +#2 \| barrier FAILED +\| - +\| \S*test_collectives_hangs.py:\d+", table), table
    assert re.search(r"   world +#1 \| all_reduce float32\[3\] done +\| all_reduce float32\[3\] done", table)
    _assert_no_children()


@pytest.mark.parametrize("ranks", [2, 4])
def test_uneven_data_under_ddp_names_the_gradient_all_reduce(ranks: int) -> None:
    pool = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": ranks}, num_processes=ranks,
                    make_fabric=build_rank_fabric).start()
    try:
        started = time.monotonic()
        with pytest.raises(CollectiveHangError) as caught:
            pool.run(_ddp_uneven_steps, timeout=120.0)
        assert time.monotonic() - started < AT_ONCE
    finally:
        pool.stop()
    error = caught.value
    message = str(error)
    seq = error.waiting[0].seq
    assert re.search(rf"rank 0 waits in DDP's gradient all-reduce #{seq} \(bucket of 15 float32\) at "
                     r"\S*test_collectives_hangs.py:\d+ in _ddp_uneven_steps: fabric.backward\(loss\)", message)
    assert f"rank 1 finished the function without calling it; its last collective there was torch-internal " \
           f"all_reduce #{seq - 1} (float32[15])" in message
    for rank in range(ranks):  # every rank's ledger has DDP's bucket all-reduces, numbered
        reduces = _internal_all_reduces(error.ledgers[rank])
        assert len(reduces) >= 3 and all(e.shapes == ((15,),) for e in reduces)
        assert len({e.seq for e in reduces}) == len(reduces)
    assert error.ledger().first_divergence == ("0", seq)
    table = str(error.ledger())
    assert re.search(rf">> world +#{seq} \| DDP:all_reduce float32\[15\] WAITING +\| - ", table), table
    assert re.search(rf"   world +#{seq - 1} \| torch:all_reduce float32\[15\] done +\| torch:all_reduce", table), table
    _assert_no_children()


def _ddp_uneven_launched(fabric):
    return _ddp_uneven_steps(fabric)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_uneven_data_under_ddp_in_launch(start_method: str) -> None:
    """launch(fn) ranks exit once done, so the waiting rank's all-reduce fails (gloo: peer gone) rather
    than hangs; it is explained the same way."""
    started = time.monotonic()
    with pytest.raises(CollectiveHangError) as caught:
        launch(_ddp_uneven_launched, devices=2, accelerator="cpu", start_method=start_method, **PATIENT)
    assert time.monotonic() - started < AT_ONCE + 10  # spawn starts fresh interpreters
    message = str(caught.value)
    seq = caught.value.waiting[0].seq
    assert re.search(rf"rank 0 waits in DDP's gradient all-reduce #{seq} \(bucket of 15 float32\) at "
                     r"\S*test_collectives_hangs.py:\d+ in _ddp_uneven_steps: fabric.backward\(loss\)", message), message
    assert f"its last collective there was torch-internal all_reduce #{seq - 1} (float32[15])" in message
    assert len(_internal_all_reduces(last_ledger().ledgers[1])) >= 3
    _assert_no_children()


def test_a_barrier_skipped_by_one_of_four_ranks() -> None:
    pool = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 4}, num_processes=4,
                    make_fabric=build_rank_fabric).start()
    try:
        with pytest.raises(CollectiveHangError) as caught:
            pool.run(_barrier_skipped_by_rank_zero, timeout=120.0)
    finally:
        pool.stop()
    message = str(caught.value)
    assert "ranks 1-3 wait in barrier #2 (name='epoch-end')" in message
    assert 'fabric.barrier("epoch-end")' in message
    assert "rank 0 finished the function without calling it" in message
    assert "`if fabric.global_rank != 0:`" not in message  # not a rank-zero guard: the general advice
    assert "same collectives in the same order" in message
    _assert_no_children()


def test_a_ddp_step_on_a_subset_of_ranks_is_reported_at_once() -> None:
    pool = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 2}, num_processes=2,
                    make_fabric=build_rank_fabric).start()
    try:
        assert pool.run(_ddp_step) == {0: "stepped", 1: "stepped"}
        started = time.monotonic()
        with pytest.raises(CollectiveHangError) as caught:
            pool.run(_ddp_step, ranks=[0], timeout=120.0)  # what %%fabric --ranks 0 does
        assert time.monotonic() - started < AT_ONCE
    finally:
        pool.stop()
    message = str(caught.value)
    # DDP's second forward first re-broadcasts its rebuilt bucket layout, rank 1 never answers
    assert re.search(r"rank 0 waits in DDP's broadcast #5 \(int32\[3\]\)", message), message
    assert "fabric.backward(model(torch.ones(2, 4)).sum())" in message
    assert "rank 1 is not running the function (--ranks)" in message
    _assert_no_children()


def test_fsdp_with_one_rank_skipping_a_forward() -> None:
    started = time.monotonic()
    with pytest.raises(CollectiveHangError) as caught:
        launch(_fsdp_rank_one_skips_a_forward, devices=2, accelerator="cpu", strategy="fsdp", **PATIENT)
    assert time.monotonic() - started < AT_ONCE + 20  # FSDP's set-up is slower
    message = str(caught.value)
    seq = caught.value.waiting[0].seq
    assert seq == max(e.seq for e in caught.value.ledgers[1]) + 1  # the one rank 1 never issued
    assert re.search(rf"rank 0 waits in FSDP's all-gather #{seq} (\(float32\[29\]\) )?at \S*test_collectives_hangs.py:\d+ "
                     r"in _fsdp_rank_one_skips_a_forward: loss = model\(torch.ones\(2, 4\)\).sum\(\)", message)
    assert "rank 1 finished the function without calling it" in message
    ledger = caught.value.ledgers[1]
    assert {e.op for e in ledger if e.origin == "torch"} >= {"all_gather", "all_reduce"}  # gloo: no reduce_scatter
    _assert_no_children()


# -- the uncertain case: the threshold-based stall report, now with torch's own collectives ------
def test_a_rank_in_an_endless_loop_gets_a_stall_report_naming_ddps_all_reduce(capsys) -> None:
    with pytest.raises(LaunchTimeoutError) as caught:
        launch(_ddp_then_endless_loop_on_rank_one, devices=2, accelerator="cpu", stall=1.0, timeout=8.0)
    err = capsys.readouterr().err
    assert re.search(r"stall: rank 0 has waited in DDP's gradient all-reduce #\d+ \(bucket of 15 float32\) at "
                     r"\S*test_collectives_hangs.py:\d+ in _ddp_then_endless_loop_on_rank_one: "
                     r"fabric.backward\(loss\) for \d", err), err
    assert "rank 1 is not in that collective" in err and "while True:  # never reaches" in err  # where rank 1 is instead
    assert re.search(r"fabric.backward\(loss\)\n\S* +\.\.\. \d+ frames inside notebook_fabric/torch hidden", err), err
    assert "torch/autograd" not in err  # folded
    assert "rank 0 waits in DDP's gradient all-reduce" in str(caught.value)
    _assert_no_children()


# -- mismatches, stopped by debug mode; the ledger keeps DDP's all-reduces ----------------------
@pytest.mark.parametrize("what, rank0, rank1", [
    ("shape", "all_reduce(float32[4]) reduce_op=sum", "all_reduce(float32[5]) reduce_op=sum"),
    ("dtype", "all_reduce(float32[4]) reduce_op=sum", "all_reduce(float64[4]) reduce_op=sum"),
    ("src", "broadcast(float32[2]) src=0", "broadcast(float32[2]) src=1"),
])
def test_mismatched_collectives_are_named_with_ranks_shapes_and_lines(what: str, rank0: str, rank1: str) -> None:
    with pytest.raises(CollectiveMismatchError) as caught:
        launch(_ddp_then_mismatch, what, devices=4, accelerator="cpu", debug=True, **PATIENT)
    message = str(caught.value)
    for rank in range(4):
        assert re.search(rf"rank {rank}: #\d+ {re.escape(rank0 if rank % 2 == 0 else rank1)}", message)
    assert "test_collectives_hangs.py" in message and "_ddp_then_mismatch" in message
    for rank, entries in last_ledger().ledgers.items():
        reduces = _internal_all_reduces(entries)
        assert reduces and all(e.seq > 0 and e.state == "finished" for e in reduces), rank
    _assert_no_children()


# -- folding ---------------------------------------------------------------------
def test_library_frames_fold_into_one_line_and_an_option_shows_them(monkeypatch) -> None:
    import traceback

    from notebook_fabric.live.fold import ALL_FRAMES_VARIABLE, fold_frames

    try:
        nn.Linear(3, 3)(torch.ones(2))  # raises below torch's own Python frames (Module.__call__ ...)
    except RuntimeError as error:
        text = "".join(traceback.format_exception(error))
    folded = fold_frames(text)
    assert "test_collectives_hangs.py" in folded and "RuntimeError" in folded
    assert re.search(r"\.\.\. \d+ frames? inside notebook_fabric/torch hidden", folded), folded
    assert "torch/nn/modules/module.py" in text and "torch/nn/modules/module.py" not in folded
    monkeypatch.setenv(ALL_FRAMES_VARIABLE, "1")
    assert fold_frames(text) == text


# -- a rank that fails while another waits --------------------------------------------------------
def _rank_one_fails_before_the_barrier(fabric):
    fabric.all_reduce(torch.ones(2))
    if fabric.global_rank == 1:
        raise ValueError("bad batch on rank 1")
    fabric.barrier("after-step")


def test_a_failing_rank_raises_its_error_and_names_who_waited_in_what() -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="bad batch on rank 1") as caught:
        launch(_rank_one_fails_before_the_barrier, devices=2, accelerator="cpu", **PATIENT)
    assert time.monotonic() - started < AT_ONCE
    notes = "\n".join(caught.value.__notes__)
    assert "rank 0 waits in barrier #2 (name='after-step')" in notes
    assert 'fabric.barrier("after-step")' in notes
    assert "rank 1 failed (ValueError: bad batch on rank 1) without calling it" in notes
    _assert_no_children()
