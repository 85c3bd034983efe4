"""A hundred launches in a row in one process: no port clash, no leaked process, fd or port."""
from __future__ import annotations

import threading

import pytest

from support.processes import listening_ports, open_connections, open_fds, rank_like_children, wait_no_children
from notebook_fabric import launch

pytestmark = pytest.mark.timeout(300)


def rank_of(fabric):
    return fabric.global_rank


def test_one_hundred_launches_leak_nothing(clean_environment):
    assert launch(rank_of, accelerator="cpu") == 0  # warm up: lazy imports, caches
    fds, connections, ports = open_fds(), open_connections(), listening_ports()
    threads = threading.active_count()
    for attempt in range(100):
        assert launch(rank_of, accelerator="cpu", return_all=True) == [0, 1], f"launch {attempt}"
        assert rank_like_children() == [], f"ranks left after launch {attempt}"
    assert wait_no_children() == []
    assert open_fds() == fds
    assert open_connections() == connections
    assert listening_ports() == ports
    assert threading.active_count() == threads
