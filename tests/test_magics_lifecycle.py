"""Pool processes end with the kernel: a clean shutdown, and a kernel killed outright."""
from __future__ import annotations

import os
import signal

from support.kernels import Kernel, parse_status_pids
from support.processes import wait_gone


def start_pool(kernel: Kernel) -> list:
    kernel.ok("%load_ext notebook_fabric")
    kernel.ok("%%fabric --devices 2 --accelerator cpu\nimport time\nstate = fabric.global_rank")
    pids = list(parse_status_pids(kernel.ok("%fabric status").stdout).values())
    assert len(pids) == 2
    return pids


def test_kernel_shutdown_ends_the_pool() -> None:
    kernel = Kernel()
    try:
        ranks = start_pool(kernel)
    finally:
        kernel.shutdown()  # a shutdown_request: the kernel exits normally
    assert not wait_gone(ranks)


def test_killed_kernel_takes_its_ranks_along() -> None:
    kernel = Kernel()
    try:
        ranks = start_pool(kernel)
        busy = kernel.send("%%fabric\ntime.sleep(60)")  # the ranks are busy in a cell, too
        os.kill(kernel.pid, signal.SIGKILL)  # no atexit, no goodbye: the parent-death signal must do it
        assert not wait_gone(ranks)
        assert busy
    finally:
        kernel.client.stop_channels()
        kernel.km.cleanup_resources()
