"""The persistent RankPool behind the %%fabric magic: namespaces, push/pull, where, interrupt, status."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from support.processes import InterruptWhen, pid_alive, touch, wait_for_file, wait_no_children
from support.waiting import poll, wait_until
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric.launching import PoolClosedError
from notebook_fabric.launching.pool import RankPool
from notebook_fabric.live.events import Heartbeat, Output
from notebook_fabric.live.sinks import RecordingSink

pytestmark = pytest.mark.timeout(120)
CPU_DDP = {"accelerator": "cpu", "strategy": "ddp", "devices": 2}


@pytest.fixture
def pool(clean_environment):
    sink = RecordingSink()
    pool = RankPool(CPU_DDP, num_processes=2, make_fabric=build_rank_fabric, sink=sink, heartbeat_interval=0.2).start()
    yield pool
    pool.stop()
    assert wait_no_children() == []


def test_namespace_persists_between_tasks_and_push_pull(pool):
    pool.push({"scale": 3})
    pool.run(lambda fabric, ns: ns.__setitem__("weights", torch.full((2,), float(fabric.global_rank)) * ns["scale"]))
    assert pool.run(lambda fabric, ns: ns["weights"].sum().item()) == {0: 0.0, 1: 6.0}
    pulled = pool.pull("weights")
    assert pulled[1].tolist() == [3.0, 3.0] and pulled[1].device.type == "cpu"
    assert list(pool.pull("weights", ranks=[1])) == [1]
    assert pool.run(lambda fabric, ns: ns["fabric"] is fabric) == {0: True, 1: True}


def test_subset_of_ranks_and_collectives_across_tasks(pool):
    assert pool.run(lambda fabric, ns: fabric.global_rank, ranks=[1]) == {1: 1}
    reduced = pool.run(lambda fabric, ns: fabric.all_reduce(torch.ones(1), reduce_op="sum").item())
    assert reduced == {0: 2.0, 1: 2.0}


def test_python_exception_leaves_the_pool_usable(pool):
    with pytest.raises(ZeroDivisionError) as caught:
        pool.run(lambda fabric, ns: 1 / 0)
    assert caught.value.ranks == [0, 1]
    assert pool.alive
    assert pool.run(lambda fabric, ns: "still here") == {0: "still here", 1: "still here"}


def test_interrupt_raises_keyboard_interrupt_in_ranks_and_the_pool_survives(pool, tmp_path):
    marker = str(tmp_path / "sleeping")

    def sleep_long(fabric, ns):
        touch(f"{marker}{fabric.global_rank}")
        time.sleep(300)

    interrupter = InterruptWhen(lambda: os.path.exists(f"{marker}0") and os.path.exists(f"{marker}1"), 60,
                                "both ranks in their task (their marker files)")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # both ranks are in their task (markers): wait for their answers, not a clock
        pool.run(sleep_long, interrupt_grace=60)
    interrupter.check()
    assert time.monotonic() - started < 60
    assert pool.alive
    assert pool.run(lambda fabric, ns: fabric.global_rank) == {0: 0, 1: 1}


def test_where_answers_while_a_task_is_stuck_in_a_barrier(pool, tmp_path):
    marker = str(tmp_path / "waiting")

    def rank_one_lags(fabric, ns):
        if fabric.global_rank == 1:
            touch(marker)
            time.sleep(300)
        fabric.barrier(name="sync-point")

    stacks = {}
    waited = []

    def ask_where():
        # rank 1 is in its sleep (its marker) and the pool shows rank 0 inside the barrier
        waited.append(wait_for_file(marker) and bool(poll(lambda: pool.status()[0].state.startswith("in barrier"), 60)))
        stacks.update(pool.where())
        pool.interrupt()

    asker = threading.Thread(target=ask_where)
    asker.start()
    with pytest.raises(KeyboardInterrupt):  # rank 1's, re-raised here; rank 0 (stuck in gloo) was ended
        pool.run(rank_one_lags, timeout=60)
    asker.join()
    assert waited == [True], f"rank 0 was never shown in the barrier: {pool.status()}"
    assert "barrier #1 (name='sync-point')" in stacks[0] and "in rank_one_lags" in stacks[0]
    assert "time.sleep(300)" in stacks[1]


def test_status_reports_pids_memory_and_heartbeats(pool, tmp_path):
    go = str(tmp_path / "go")
    released = []

    def release():  # the task runs until its heartbeats have reached the sink
        released.append(bool(poll(lambda: any(isinstance(e, Heartbeat) for e in pool.sink.events), 60)))
        touch(go)

    def until_released(fabric, ns):
        while not os.path.exists(go):
            time.sleep(0.02)

    threading.Thread(target=release, daemon=True).start()
    pool.run(until_released)
    assert released == [True], "no heartbeat reached the sink while the task ran"
    status = pool.status()
    assert sorted(status) == [0, 1]
    for rank, line in status.items():
        assert line.pid == pool.pids[rank] and pid_alive(line.pid)
        assert line.state == "idle"
        assert line.rss_bytes and line.rss_bytes > 10_000_000
        assert line.seconds_since_heartbeat is not None and line.seconds_since_heartbeat < 5
    assert any(isinstance(e, Heartbeat) for e in pool.sink.events)


def test_output_between_tasks_is_not_lost(pool):
    pool.run(lambda fabric, ns: print(f"last words of {fabric.global_rank}", end=""))
    assert pool.sink.output(0) == "last words of 0"
    assert all(isinstance(e, Output) for e in pool.sink.events if getattr(e, "text", None))


def test_stop_kills_rank_children_and_the_pool_refuses_more_work(clean_environment):
    pool = RankPool(CPU_DDP, num_processes=2, make_fabric=build_rank_fabric, sink=RecordingSink()).start()
    grandchildren = pool.run(lambda fabric, ns: ns.setdefault("child", __import__("subprocess").Popen(["sleep", "300"])).pid)
    pool.stop()
    assert not any(pid_alive(pid) for pid in grandchildren.values())
    assert not any(pid_alive(pid) for pid in pool.pids)
    with pytest.raises(PoolClosedError):
        pool.run(lambda fabric, ns: None)


def test_a_rank_killed_between_tasks_is_reported_on_the_next_run(pool):
    os.kill(pool.pids[1], signal.SIGKILL)
    wait_until(lambda: not pool.alive, 30, "the pool to notice that rank 1 died")
    with pytest.raises(PoolClosedError, match="rank 1"):
        pool.run(lambda fabric, ns: None)


def test_a_pool_started_from_a_short_lived_thread_outlives_it(clean_environment):
    """The parent-death signal follows the starting thread: pools started off the main thread
    are started by a long-lived starter thread instead."""
    started = []
    starter = threading.Thread(target=lambda: started.append(
        RankPool(CPU_DDP, 2, make_fabric=build_rank_fabric, sink=RecordingSink()).start()))
    starter.start()
    starter.join()
    pool = started[0]
    try:
        # the parent-death signal would come as the starter's OS thread ends, after join() returns
        wait_until(lambda: not os.path.exists(f"/proc/self/task/{starter.native_id}"), 30,
                   "the starter's OS thread to have ended")
        assert pool.run(lambda fabric, ns: fabric.global_rank) == {0: 0, 1: 1}
        assert pool.alive and all(pid_alive(pid) for pid in pool.pids)
    finally:
        pool.stop()
