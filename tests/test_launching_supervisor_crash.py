"""A crash of the notebook's supervisor thread (the one that reads the ranks' messages) ends the
launch at once with an error naming the crash, instead of a wait for events that never come (the
120 s start timeout, or a whole run). The crash is real: rank 1 sends, on its own channel, an event
of a class that only exists in that rank, so the supervisor cannot unpickle it."""
from __future__ import annotations

import gc
import os
import sys
import time
import types
import warnings
from typing import Any, Mapping

import pytest

from support.processes import wait_no_children
from notebook_fabric import launch
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric.launching import RankPool, SupervisorCrashedError

pytestmark = pytest.mark.timeout(120)
ENDS_WITHIN = 20.0  # seconds; generous for 2 shared cores (the start timeout is 120 s)


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


def send_an_event_only_this_rank_can_read() -> None:
    """Put on this rank's outbox an object of a class from a module the notebook does not have."""
    from notebook_fabric.launching.rank.output import Outbox

    module = types.ModuleType("only_in_this_rank")
    sys.modules[module.__name__] = module
    exec("class RankOnlyEvent:\n    rank = 1\n", module.__dict__)
    with warnings.catch_warnings():  # isinstance() on every object touches torch's deprecated lazy names
        warnings.simplefilter("ignore")
        outbox = next(item for item in gc.get_objects() if isinstance(item, Outbox))
    outbox.put(module.RankOnlyEvent())


def fabric_after_a_malformed_message(fabric_kwargs: Mapping[str, Any]) -> Any:
    if os.environ.get("RANK") == "1":
        send_an_event_only_this_rank_can_read()
    return build_rank_fabric(fabric_kwargs)


def assert_names_the_crash(error: SupervisorCrashedError) -> None:
    assert error.rank == 1
    assert "supervisor thread" in str(error) and "rank 1" in str(error)
    assert "No module named 'only_in_this_rank'" in str(error)
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_a_crash_while_the_ranks_start_ends_the_start_at_once() -> None:
    pool = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 2}, num_processes=2,
                    make_fabric=fabric_after_a_malformed_message)
    started = time.monotonic()
    with pytest.raises(SupervisorCrashedError) as caught:
        pool.start(timeout=120)
    assert time.monotonic() - started < ENDS_WITHIN
    assert_names_the_crash(caught.value)


def malformed_message_then_wait(fabric: Any) -> None:
    if fabric.global_rank == 1:
        send_an_event_only_this_rank_can_read()
    time.sleep(60)  # both ranks keep running: only the crash can end the launch early


def test_a_crash_during_a_run_ends_the_launch_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(SupervisorCrashedError) as caught:
        launch(malformed_message_then_wait, accelerator="cpu", devices=2, stall=None)
    assert time.monotonic() - started < ENDS_WITHIN
    assert_names_the_crash(caught.value)
