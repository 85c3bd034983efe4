"""Tests on torch_xla's CPU device (``scripts/xla_env.sh`` builds their environment and runs them).

Every module here starts with ``pytest.importorskip("torch_xla")``: the main suite, whose torch
torch_xla cannot load, skips them and says why. XLA:CPU runs each launch's ranks as threads of one
child process (see ``notebook_fabric/strategies/xla_devices.py``); the fixture below checks that
nothing of it is left after each test.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterator

import psutil
import pytest

from support.waiting import poll

if importlib.util.find_spec("torch_xla") is not None:
    os.environ.setdefault("PJRT_DEVICE", "CPU")  # no TPU here: torch_xla's CPU device


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """After the test, no child of this process survives (the launch's rank process ended)."""
    yield
    me = psutil.Process()

    def living() -> list:
        found = []
        for child in me.children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    poll(lambda: not living(), 10.0, interval=0.1)
    left = living()
    for child in left:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left behind: {[(c.pid, c.cmdline()) for c in left]}"
