"""The widget sink itself (ipywidgets with no front end attached): coalesced updates, the output
cap marker, the plot appearing with the first metric, the frozen summary's two representations.

Real widgets (their comm is the ``comm`` package's no-op one outside a kernel); the events are
the dataclasses ranks send. Runs with real ranks are in ``test_live_dashboard_model.py`` and the
kernel and browser tests.
"""
from __future__ import annotations

import time

import pytest

pytest.importorskip("ipywidgets")

from notebook_fabric.live.dashboard import DashboardSink  # noqa: E402
from notebook_fabric.live.events import (  # noqa: E402
    CollectiveEntered, CollectiveExited, CollectiveState, MemorySample, Metrics, Output, Progress, TaskDone,
    TaskStarted,
)


def test_a_burst_of_events_is_one_update_per_widget_and_nothing_new_sends_nothing() -> None:
    sink = DashboardSink(range(2), max_lines=50)
    now = time.time()
    sink.render()
    baseline = sink.updates
    for rank in range(2):
        sink.handle(TaskStarted(rank=rank, time=now, task_id=1))
        sink.handle(MemorySample(rank=rank, time=now, rss_bytes=300 * 2**20, rss_peak_bytes=310 * 2**20))
    for i in range(1000):
        sink.handle(Output(rank=0, time=now, stream="stdout", text=f"line {i}\n"))
        sink.handle(Progress(rank=0, time=now, bar=7, desc="train", n=i + 1, total=1000, rate=500.0))
    sink.render()
    # the table and rank 0's output changed (the header too if a second went by): two thousand
    # events, at most three values sent
    sent = sink.updates - baseline
    assert 2 <= sent <= 3
    sink.render()
    assert sink.updates - baseline == sent  # nothing new: nothing sent
    table = sink._table.value
    assert "RSS 300.0 MiB (peak 310.0 MiB)" in table and "train 1000/1000 (500.0 it/s)" in table
    assert "950 earlier lines not shown" in sink._outputs[0].value and "line 999" in sink._outputs[0].value
    assert sink._outputs[1].value.count("no output yet") == 1


def test_collective_state_plot_and_frozen_summary() -> None:
    sink = DashboardSink(range(2))
    now = time.time()
    for rank in range(2):
        sink.handle(TaskStarted(rank=rank, time=now, task_id=1))
    state = CollectiveState(seq=17, op="all_reduce", meta={"shapes": ((4, 8),), "dtypes": ("torch.float32",)},
                            entered_at=now - 3.1)
    sink.handle(CollectiveEntered(rank=1, time=now, state=state))
    sink.render()
    assert "in all_reduce #17 (float32[4, 8]) for 3." in sink._table.value
    assert sink._plot.layout.display == "none"
    sink.handle(Metrics(rank=0, time=now, points=tuple((s, {"loss": 1.0 / (s + 1)}) for s in range(10))))
    sink.handle(CollectiveExited(rank=1, time=now, seq=17))
    sink.handle(CollectiveEntered(rank=0, time=now, state=CollectiveState(
        seq=18, op="barrier", meta={"name": "save_checkpoint", "dtypes": ()}, entered_at=now)))
    sink.render()
    assert "<polyline" in sink._plot.value and sink._plot.layout.display is None
    assert "at barrier &#x27;save_checkpoint&#x27;" in sink._table.value
    for rank in range(2):
        sink.handle(TaskDone(rank=rank, time=now, task_id=1, payload=b""))
    sink.model.finish()
    bundle = sink.summary_bundle()
    assert set(bundle) == {"text/html", "text/plain"}
    assert 'class="nbf-summary"' in bundle["text/html"] and "<svg" in bundle["text/html"]
    assert "loss: 1 -> 0.1 over 10 points" in bundle["text/plain"]
    assert bundle["text/plain"].count(" done ") == 2


def test_cuda_ranks_show_allocated_reserved_peak_and_total() -> None:
    """The memory column of a CUDA rank, from the sample the rank's sampler sends (figures as torch.cuda gives them)."""
    sink = DashboardSink(range(1))
    now = time.time()
    sink.handle(TaskStarted(rank=0, time=now, task_id=1))
    sink.handle(MemorySample(rank=0, time=now, rss_bytes=2**30, rss_peak_bytes=2**30, device="cuda:0",
                             allocated_bytes=3 * 2**30, reserved_bytes=4 * 2**30, peak_allocated_bytes=5 * 2**30,
                             total_bytes=80 * 2**30))
    sink.render()
    assert "cuda:0 allocated 3.0 GiB, reserved 4.0 GiB, peak 5.0 GiB of 80.0 GiB" in sink._table.value
    sink.handle(TaskDone(rank=0, time=now, task_id=1, payload=b""))
    sink.model.finish()
    assert "cuda:0 peak 5.0 GiB of 80.0 GiB" in sink.summary_bundle()["text/plain"]
