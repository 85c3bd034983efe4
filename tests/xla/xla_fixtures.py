"""Tests on torch_xla's CPU device (``scripts/xla_env.sh`` builds their environment and runs them).

Every module here starts with ``pytest.importorskip("torch_xla")``: the main suite, whose torch
torch_xla cannot load, skips them and says why. XLA:CPU runs each launch's ranks as threads of one
child process (see ``notebook_fabric/strategies/xla_devices.py``); the fixture below checks that
nothing of it is left after each test. Each test module imports it (a module of its own, not a
conftest.py: a second ``conftest`` module beside tests/conftest.py shadows it wherever a test module
or a spawned rank imports ``conftest``).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterator

import pytest

from support.processes import kill_and_reap, living_descendants
from support.waiting import poll

if importlib.util.find_spec("torch_xla") is not None:
    os.environ.setdefault("PJRT_DEVICE", "CPU")  # no TPU here: torch_xla's CPU device


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """After the test, no child of this process survives (the launch's rank process ended);
    multiprocessing's own helpers (the resource tracker spawn starts once) are not ranks."""
    yield
    poll(lambda: not living_descendants(), 10.0, interval=0.1)
    left = living_descendants()
    kill_and_reap(left)
    assert not left, f"processes left behind: {[(c.pid, c.cmdline()) for c in left]}"
