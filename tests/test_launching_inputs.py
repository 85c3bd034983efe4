"""Bad input is refused before any rank starts, with a message that says what to do."""
from __future__ import annotations

import threading

import pytest

from support.processes import rank_like_children
from notebook_fabric import launch
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric.launching import UnpicklableError, run_function
from notebook_fabric.launching import preflight

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def nothing_starts(clean_environment):
    yield
    assert rank_like_children() == []


def noop(fabric, *args):
    return None


@pytest.mark.parametrize("devices", [0, -3])
def test_devices_zero_or_negative(devices):
    with pytest.raises(ValueError, match="devices"):
        launch(noop, accelerator="cpu", devices=devices)


def test_more_cuda_devices_than_exist():
    with pytest.raises((ValueError, RuntimeError), match="(?i)cuda|gpu|device"):
        launch(noop, accelerator="cuda", devices=64)


def test_unknown_start_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'fork', 'spawn', 'forkserver'"):
        launch(noop, accelerator="cpu", start_method="thread")


def test_unknown_start_method_through_run_function():
    with pytest.raises(ValueError, match="'fork', 'spawn', 'forkserver'"):
        run_function({"accelerator": "cpu"}, noop, (), make_fabric=build_rank_fabric, num_processes=2,
                     start_method="vfork")


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_unpicklable_argument_names_the_argument_and_why(start_method):
    with pytest.raises(UnpicklableError) as caught:
        launch(noop, 1, threading.Lock(), accelerator="cpu", start_method=start_method)
    message = str(caught.value)
    assert "argument 2 of noop (args[1])" in message
    assert "_thread.lock" in message
    assert "start_method='fork'" in message  # what to do instead
    assert isinstance(caught.value, TypeError)


def test_generator_argument_is_refused_under_spawn():
    with pytest.raises(UnpicklableError, match="argument 1 of noop.*generator"):
        launch(noop, (i for i in range(3)), accelerator="cpu", start_method="spawn")


def test_unpicklable_keyword_argument_of_fabric_launch():
    with pytest.raises(UnpicklableError, match="keyword argument 'guard'"):
        run_function({"accelerator": "cpu"}, noop, (), {"guard": threading.Lock()}, make_fabric=build_rank_fabric,
                     num_processes=2, start_method="spawn")


def test_not_a_function():
    with pytest.raises(TypeError, match="function"):
        launch("train.py", accelerator="cpu")


def test_fork_after_cuda_initialisation(monkeypatch):
    """CUDA cannot be initialised on this CPU machine, so the decision itself is exercised."""
    monkeypatch.setattr(preflight, "cuda_initialized", lambda: True)
    notices = []
    assert preflight.resolve_start_method(None, notices.append) == "spawn"
    assert "instead of 'fork'" in notices[0]
    with pytest.raises(RuntimeError) as caught:
        preflight.resolve_start_method("fork")
    assert "start_method='spawn'" in str(caught.value)
    assert "Cannot re-initialize CUDA" not in str(caught.value)
    assert preflight.resolve_start_method("forkserver") == "forkserver"


def test_default_is_fork_here():
    assert preflight.resolve_start_method(None) == "fork"
