"""Every fault ends in a clear error within seconds, and leaves no process behind.

An exception on one rank or on all, os._exit, SIGKILL, a segfault, a rank that never reaches a
barrier (with a timeout), and an interrupt of the caller while ranks wait in a collective.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from support.processes import InterruptWhen, touch, touch_once_main_thread_waits_in, wait_no_children
from notebook_fabric import launch
from notebook_fabric.launching import LaunchTimeoutError, RankDiedError, RemoteTraceback

pytestmark = pytest.mark.timeout(120)
COMES_BACK_WITHIN = 20.0  # seconds; generous for 2 shared cores


class ShapeMismatch(ValueError):
    """A user-defined exception type: it must come back as itself."""


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


def timed_launch(fn, *args, **kwargs):
    started = time.monotonic()
    try:
        launch(fn, *args, accelerator="cpu", devices=2, **kwargs)
    except BaseException as error:  # noqa: BLE001 - the test inspects whatever came back
        elapsed = time.monotonic() - started
        assert elapsed < COMES_BACK_WITHIN, f"took {elapsed:.1f} s"
        return error
    raise AssertionError("launch() returned instead of raising")


def fails_on_rank_one(fabric):
    if fabric.global_rank == 1:
        raise ShapeMismatch("expected [4, 8], got [4, 9]")
    fabric.barrier()  # rank 0 waits in a collective that rank 1 never joins


def test_exception_on_one_rank_is_reraised_as_its_type_with_rank_and_remote_traceback():
    error = timed_launch(fails_on_rank_one)
    assert type(error) is ShapeMismatch
    assert str(error) == "expected [4, 8], got [4, 9]"
    assert error.rank == 1 and error.ranks == [1]
    assert "in fails_on_rank_one" in error.remote_traceback
    assert 'raise ShapeMismatch("expected [4, 8], got [4, 9]")' in error.remote_traceback
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "Traceback on rank 1" in str(error.__cause__)
    assert any("raised on rank 1" in note for note in error.__notes__)


def fails_everywhere(fabric):
    raise KeyError("missing 'lr' in config")


def test_identical_exceptions_on_all_ranks_are_reported_once():
    error = timed_launch(fails_everywhere)
    assert type(error) is KeyError
    assert error.ranks == [0, 1]
    notes = "\n".join(error.__notes__)
    assert "ranks 0-1" in notes and "shown once" in notes
    assert notes.count("KeyError") == 0  # one group only: no "other ranks failed too" list


def exits_on_rank_one(fabric):
    if fabric.global_rank == 1:
        os._exit(3)
    fabric.barrier()


def test_os_exit_is_reported_with_rank_and_exit_code():
    error = timed_launch(exits_on_rank_one)
    assert type(error) is RankDiedError
    assert error.rank == 1 and error.exitcode == 3
    assert "rank 1 exited with code 3" in str(error)
    notes = "\n".join(error.__notes__)  # rank 0 was stopped, or failed in the barrier first
    assert "other ranks (rank 0) were stopped" in notes or "meanwhile on the other ranks: rank 0" in notes


def killed_on_rank_one(fabric):
    if fabric.global_rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    fabric.barrier()


def test_sigkill_is_reported_with_the_signal():
    error = timed_launch(killed_on_rank_one)
    assert type(error) is RankDiedError
    assert error.rank == 1 and error.signal == signal.SIGKILL
    assert "rank 1 killed by signal SIGKILL" in str(error)


def segfaults_on_rank_zero(fabric):
    if fabric.global_rank == 0:
        import ctypes

        ctypes.string_at(0)
    fabric.barrier()


def test_segfault_is_reported_with_the_python_stack_of_the_crash():
    error = timed_launch(segfaults_on_rank_zero)
    assert type(error) is RankDiedError
    assert error.rank == 0 and error.signal == signal.SIGSEGV
    message = str(error)
    assert "rank 0 killed by signal SIGSEGV (segmentation fault)" in message
    assert "Fatal Python error: Segmentation fault" in message
    assert "in segfaults_on_rank_zero" in message  # faulthandler's stack, read from the dead rank's pipe


def never_reaches_the_barrier(fabric):
    if fabric.global_rank == 1:
        time.sleep(300)
    fabric.barrier(name="epoch-end")


def test_timeout_names_who_waits_in_which_collective_and_where_the_others_are():
    error = timed_launch(never_reaches_the_barrier, timeout=3)
    assert isinstance(error, LaunchTimeoutError) and isinstance(error, TimeoutError)
    message = str(error)
    assert "timeout=3 s" in message
    assert "rank 0 waits in barrier #1 (name='epoch-end')" in message
    assert "rank 1 is elsewhere" in message and "time.sleep(300)" in message
    assert list(error.waiting) == [0] and error.waiting[0].op == "barrier"
    assert list(error.elsewhere) == [1]


def waits_in_barrier_while_rank_one_sleeps(fabric, marker):
    if fabric.global_rank == 1:
        touch(f"{marker}1")  # inside its task: the interrupt will land in the sleep
        time.sleep(300)
    touch_once_main_thread_waits_in("barrier", f"{marker}0")
    fabric.barrier()


def test_interrupt_while_ranks_wait_in_a_collective_returns_control_and_next_launch_works(tmp_path, capsys):
    marker = str(tmp_path / "in-task")

    # on state, not time: rank 1 is in its task, rank 0's main thread is inside the barrier
    interrupter = InterruptWhen(lambda: os.path.exists(f"{marker}1") and os.path.exists(f"{marker}0"), 60,
                                "rank 1 in its task and rank 0's main thread inside the barrier")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch(waits_in_barrier_while_rank_one_sleeps, marker, accelerator="cpu")
    interrupter.check()
    interrupted_at = os.path.getmtime(f"{marker}0")
    assert time.time() - interrupted_at < COMES_BACK_WITHIN
    assert time.monotonic() - started < 60
    assert wait_no_children() == []
    err = capsys.readouterr().err
    assert "rank 1 interrupted at" in err and "in waits_in_barrier_while_rank_one_sleeps" in err
    # rank 0 is stuck in gloo: it stops once rank 1 has left, or is terminated
    assert "rank 0 interrupted at" in err or ("rank 0 did not stop" in err and "rank 0 in barrier #1" in err)
    assert launch(lambda fabric: fabric.world_size, accelerator="cpu") == 2
