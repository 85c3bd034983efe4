"""launch(fn)'s stall watchdog: ranks waiting in a collective the others have not entered are reported."""
import time

from notebook_fabric import launch


def _rank_one_is_late(fabric):
    if fabric.global_rank == 1:
        time.sleep(6)  # rank 0 waits in the barrier meanwhile
    fabric.barrier("late")
    return "done"


def test_a_stall_is_reported_with_who_waits_where_and_the_others_stacks(capsys) -> None:
    assert launch(_rank_one_is_late, devices=2, accelerator="cpu", stall=1.0) == "done"
    err = capsys.readouterr().err
    assert "[notebook-fabric] stall: rank 0 has waited in barrier #1" in err
    assert "name='late'" in err
    assert "rank 1 is not in that collective" in err
    assert "_rank_one_is_late" in err and "time.sleep(6)" in err  # rank 1's stack shows where it is


def test_stall_none_turns_the_report_off(capsys) -> None:
    assert launch(_rank_one_is_late, devices=2, accelerator="cpu", stall=None) == "done"
    assert "stall:" not in capsys.readouterr().err
