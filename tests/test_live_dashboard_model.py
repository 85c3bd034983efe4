"""The dashboard's model fed by real 2- and 4-rank runs (real processes, gloo collectives, tqdm, fabric.log).

Each test runs a pool whose sink is a :class:`DashboardModel` (plus a recorder), then reads the
model: the states each rank went through, memory, output, progress, the plot's series, failures.
"""
from __future__ import annotations

import re

import pytest

from support.processes import wait_no_children
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric import launch
from notebook_fabric.launching.pool import RankPool
from notebook_fabric.live.dashboard_html import summary_html, summary_text, table_html
from notebook_fabric.live.dashboard_model import DashboardModel
from notebook_fabric.live.sinks import FanOutSink, RecordingSink
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


def cpu_ddp(devices: int) -> dict:
    return {"accelerator": "cpu", "strategy": "ddp", "devices": devices}


def train(fabric, namespace):
    """Collectives (an all_reduce of float32[4, 8], a named barrier), output, a tqdm bar, fabric.log."""
    import time

    import torch
    from tqdm.auto import tqdm

    ballast = torch.ones(64, 1024, 1024 // 4)  # 64 MiB resident while the task runs
    for step in range(50):
        print(f"line {step}")
    for step in tqdm(range(30), desc="epoch", mininterval=0):
        fabric.log("loss", 1.0 / (step + 1), step=step)
        time.sleep(0.002)
    total = fabric.all_reduce(torch.ones(4, 8), reduce_op="sum")
    if fabric.global_rank == 1:
        time.sleep(0.3)  # the others wait at the barrier meanwhile
    fabric.barrier("save_checkpoint")
    return float(total.sum()) + float(ballast[0, 0, 0])


@pytest.mark.parametrize("ranks", [2, 4])
def test_states_memory_output_progress_and_plot_of_a_real_run(clean_environment, ranks: int) -> None:
    model = DashboardModel(range(ranks))
    recorder = RecordingSink()
    pool = RankPool(cpu_ddp(ranks), ranks,
                    make_fabric=build_rank_fabric, sink=FanOutSink(model, recorder), trace_collectives=True,
                    heartbeat_interval=0.2).start()
    try:
        values = pool.run(train)
    finally:
        pool.stop()
    assert wait_no_children() == []
    assert values == {r: 32.0 * ranks + 1.0 for r in range(ranks)}
    for rank in range(ranks):
        view = model.views[rank]
        history = view.history
        assert history[0] == "starting" and history[-1] == "done", history
        reduce_at = next(i for i, s in enumerate(history) if re.fullmatch(r"in all_reduce #\d+ \(float32\[4, 8\]\)", s))
        barrier_at = history.index("at barrier 'save_checkpoint'")
        assert history.index("running") < reduce_at < barrier_at < len(history) - 1, history
        assert view.last_collective == "at barrier 'save_checkpoint'"
        # memory: a resident set above the 64 MiB the task holds, a peak at least as large, no device figures
        assert view.memory is not None and view.memory.device is None
        assert 64 * 2**20 < view.rss_peak_bytes < 64 * 2**30 and view.rss_peak_bytes >= view.rss_bytes > 0
        bar = view.current_progress
        assert bar is not None and bar.closed and bar.n == bar.total == 30 and bar.desc == "epoch"
        assert re.search(r"epoch: 100%\S*\s*\S* 30/30 ", view.last_line or "\n".join(view.lines))
    rank0 = list(model.views[0].lines)
    assert rank0[:50] == [f"line {i}" for i in range(50)]  # complete and in order
    assert recorder.output(0).count("line ") == 50
    assert model.metrics_rank == 0
    assert [step for step, _ in model.series["loss"]] == [float(s) for s in range(30)]
    assert model.series["loss"][-1][1] == pytest.approx(1 / 30)
    html = table_html(model)
    assert html.count('class="nbf-rank"') == ranks and "RSS" in html


def test_a_failing_rank_is_marked_red_and_the_others_not(clean_environment) -> None:
    model = DashboardModel(range(4))

    def fail_on_two(fabric, namespace):
        fabric.barrier("before")
        if fabric.global_rank == 2:
            raise ValueError("loss exploded on rank 2")
        return fabric.global_rank

    pool = RankPool(cpu_ddp(4), 4, make_fabric=build_rank_fabric, sink=model, trace_collectives=True).start()
    try:
        outcome = pool.run_task(fail_on_two)
    finally:
        pool.stop()
    assert wait_no_children() == []
    assert isinstance(outcome.error, ValueError) and sorted(outcome.failures) == [2]
    assert outcome.values == {0: 0, 1: 1, 3: 3}
    assert model.state(2) == "failed: ValueError: loss exploded on rank 2"
    assert [model.is_bad(r) for r in range(4)] == [False, False, True, False]
    assert all(model.state(r) == "done" for r in (0, 1, 3))
    assert "at barrier 'before'" in model.views[2].history
    row = re.search(r'<tr class="nbf-rank" data-rank="2" style="([^"]*)"', table_html(model))
    assert row and "color:#c62828" in row.group(1)
    model.finish()
    assert "ranks 2 failed" not in summary_html(model, "t", [0]) and "rank 2 failed" in summary_html(model, "t", [0])


def test_a_rank_that_dies_is_dead_with_its_signal_and_launch_feeds_the_model(clean_environment) -> None:
    model = DashboardModel(range(2))

    def die_on_one(fabric):
        import os
        import signal

        print(f"rank {fabric.global_rank} here")
        if fabric.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        fabric.barrier("never passed")

    from notebook_fabric.launching import RankDiedError

    with pytest.raises(RankDiedError):
        launch(die_on_one, accelerator="cpu", devices=2, sink=model)
    assert wait_no_children() == []
    assert model.state(1).startswith("dead: killed by signal SIGKILL")
    # rank 0 either saw its peer hang up in the barrier (failed) or was stopped by the launcher: not dead
    assert model.views[0].phase in ("failed", "stopped")
    assert list(model.views[0].lines) == ["rank 0 here"]
    text = summary_text(model, "launch(die_on_one)", [0])
    assert "[rank 0] rank 0 here" in text and "dead: killed by signal SIGKILL" in text


def test_output_is_capped_per_rank_with_a_marker(clean_environment) -> None:
    model = DashboardModel(range(2), max_lines=100)
    pool = RankPool(cpu_ddp(2), 2, make_fabric=build_rank_fabric, sink=model).start()
    try:
        pool.run(lambda fabric, ns: print("\n".join(f"row {i}" for i in range(1000))))
    finally:
        pool.stop()
    assert wait_no_children() == []
    view = model.views[0]
    assert list(view.lines) == [f"row {i}" for i in range(900, 1000)] and view.dropped_lines == 900
    assert "900 earlier lines not shown" in summary_html(model, "t", [0])


def test_heartbeats_between_tasks_reach_the_idle_sink_and_the_next_task_gets_the_latest(clean_environment) -> None:
    import time

    from notebook_fabric.live.events import Heartbeat

    idle = RecordingSink()  # thread-safe: the pool's reader thread calls it between tasks
    model = DashboardModel(range(2))
    pool = RankPool(cpu_ddp(2), 2,
                    make_fabric=build_rank_fabric, sink=RecordingSink(), heartbeat_interval=0.1, idle_sink=idle).start()
    try:
        wait_until(lambda: {e.rank for e in idle.events if isinstance(e, Heartbeat)} == {0, 1}, 30,
                   "heartbeats of both ranks between tasks")
        assert all(not e.in_task and e.rss_bytes > 0 for e in idle.events if isinstance(e, Heartbeat))
        pool.run(lambda fabric, ns: None, sink=model)  # the latest idle heartbeat is handed over first
    finally:
        pool.stop()
    assert wait_no_children() == []
    assert all(model.views[r].rss_bytes for r in range(2))
