"""Eight ranks on this machine: a launch, an all_reduce, an exception on rank 5, a SIGKILL of rank 7.

Each fault ends in a clear error naming the rank within seconds and leaves no process behind.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from support.processes import wait_no_children
from notebook_fabric import launch
from notebook_fabric.launching import RankDiedError

pytestmark = pytest.mark.timeout(240)
EIGHT = dict(accelerator="cpu", devices=8)
COMES_BACK_WITHIN = 60.0  # seconds; 8 ranks on 2 shared cores


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


def who_am_i(fabric):
    return (fabric.global_rank, fabric.world_size, os.getpid())


def test_eight_ranks_launch_and_return_every_value():
    values = launch(who_am_i, return_all=True, **EIGHT)
    assert [v[:2] for v in values] == [(rank, 8) for rank in range(8)]
    assert len({v[2] for v in values}) == 8 and os.getpid() not in {v[2] for v in values}


def sum_of_ranks(fabric):
    return fabric.all_reduce(torch.tensor([float(fabric.global_rank)]), reduce_op="sum").item()


def test_an_all_reduce_over_eight_ranks():
    assert launch(sum_of_ranks, return_all=True, **EIGHT) == [28.0] * 8


class RankFiveError(RuntimeError):
    pass


def raises_on_rank_five(fabric):
    if fabric.global_rank == 5:
        raise RankFiveError("rank five gave up")
    fabric.barrier()


def killed_on_rank_seven(fabric):
    if fabric.global_rank == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    fabric.barrier()


def fails(fn):
    started = time.monotonic()
    with pytest.raises(BaseException) as caught:
        launch(fn, **EIGHT)
    elapsed = time.monotonic() - started
    assert elapsed < COMES_BACK_WITHIN, f"took {elapsed:.1f} s"
    return caught.value


def test_an_exception_on_rank_five_of_eight():
    error = fails(raises_on_rank_five)
    assert type(error) is RankFiveError and str(error) == "rank five gave up"
    assert error.rank == 5
    assert 'raise RankFiveError("rank five gave up")' in error.remote_traceback


def test_a_sigkill_of_rank_seven_of_eight():
    error = fails(killed_on_rank_seven)
    assert type(error) is RankDiedError
    assert 7 in error.ranks  # peers that left the broken barrier meanwhile may be named too
    assert "rank 7 killed by signal SIGKILL" in str(error)
