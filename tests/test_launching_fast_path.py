"""What a launch's fast path must keep: forked ranks talk over socket pairs only they and the
notebook hold, ranks without an exit sentinel are still seen dying, the first task sent with the
start runs once, the /proc-free helpers a rank uses on its way in and out, and the notebook's
logging handlers inside a rank (issue 19)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from support.processes import wait_no_children
from notebook_fabric import launch
from notebook_fabric.fabric import build_rank_fabric
from notebook_fabric.launching import RankDiedError
from notebook_fabric.launching.hosts import LocalHosts
from notebook_fabric.launching.pool import RankPool
from notebook_fabric.launching.processes import close_inherited_listeners
from notebook_fabric.live.events import Output
from notebook_fabric.live.sinks import RecordingSink

pytestmark = pytest.mark.timeout(120)
CPU_DDP = {"accelerator": "cpu", "strategy": "ddp"}


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


def _socket_inodes_held(fabric, namespace):
    """The inode of every socket this rank has open."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:
            continue
        if (info.st_mode & 0o170000) == 0o140000:  # S_IFSOCK
            inodes.add(info.st_ino)
    return inodes


def test_no_forked_rank_holds_the_notebooks_end_of_any_channel():
    pool = RankPool(dict(CPU_DDP, devices=3), num_processes=3, make_fabric=build_rank_fabric, start_method="fork",
                    sink=RecordingSink()).start()
    try:
        notebook_ends = {os.fstat(h.process.channel.fileno()).st_ino for h in pool.handles}
        assert len(notebook_ends) == 3  # one socket pair per rank, connected before the rank started
        held = pool.run(_socket_inodes_held)
        assert all(not (inodes & notebook_ends) for inodes in held.values()), held
        assert pool.run(lambda fabric, ns: fabric.global_rank) == {0: 0, 1: 1, 2: 2}  # and the channels work
    finally:
        pool.stop()


def _count_runs(fabric, namespace):
    namespace["runs"] = namespace.get("runs", 0) + 1
    print(f"run {namespace['runs']} on rank {fabric.global_rank}")
    return namespace["runs"]


def test_the_first_task_sent_with_the_start_runs_once_and_its_output_comes_first():
    sink = RecordingSink()
    pool = RankPool(dict(CPU_DDP, devices=2), num_processes=2, make_fabric=build_rank_fabric, start_method="fork",
                    sink=sink)
    try:
        pool.start(first_task=_count_runs)
        assert pool.run(_count_runs) == {0: 1, 1: 1}  # collected, not sent again
        printed = "".join(e.text for e in sink.events if isinstance(e, Output))
        assert "run 1 on rank 0" in printed and "run 1 on rank 1" in printed
        assert pool.run(_count_runs) == {0: 2, 1: 2}  # a later run of the same task is sent as usual
    finally:
        pool.stop()


def test_a_first_task_that_raises_is_reported_like_any_task():
    with pytest.raises(ZeroDivisionError):
        launch(lambda fabric: 1 / (fabric.global_rank - 1), accelerator="cpu", devices=2, start_method="fork",
               sink=RecordingSink())


class _NoSentinel:
    """A real rank process that does not offer an exit sentinel (as a rank on another host does not)."""

    def __init__(self, process):
        self._process = process
        self.pid = process.pid

    sentinel = None

    def __getattr__(self, name):
        return getattr(self._process, name)


class _HostsWithoutSentinels(LocalHosts):
    def start_ranks(self, method, bootstraps, setup):
        return [_NoSentinel(process) for process in super().start_ranks(method, bootstraps, setup)]


def _exit_on_rank_one(fabric, namespace):
    if fabric.global_rank == 1:
        os._exit(3)
    return "fine"


def test_a_rank_without_an_exit_sentinel_is_still_reported_when_it_dies():
    pool = RankPool(dict(CPU_DDP, devices=2), num_processes=2, make_fabric=build_rank_fabric, start_method="fork",
                    sink=RecordingSink(), hosts=_HostsWithoutSentinels()).start()
    try:
        with pytest.raises(RankDiedError, match="rank 1 exited with code 3") as caught:
            pool.run(_exit_on_rank_one, ranks=[1])
        assert caught.value.exitcode == 3
    finally:
        pool.stop()


def test_has_children_asks_waitpid_and_sees_living_and_ended_children():
    script = textwrap.dedent("""
        import os, subprocess, sys
        from notebook_fabric.launching.processes import has_children
        assert has_children() is False
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        assert has_children() is True
        child.kill()
        child.wait()
        assert has_children() is False
        quick = subprocess.Popen([sys.executable, "-c", "pass"])
        os.waitid(os.P_PID, quick.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped yet
        assert has_children() is True  # it reaps it, and says there may be more
        assert has_children() is False
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_forked_process_closes_only_the_candidate_that_listens_on_the_port():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    port = listening.getsockname()[1]
    other = socket.socket()  # bound, not listening: must stay open
    other.bind(("127.0.0.1", 0))
    read_end, write_end = os.pipe()  # not a socket: must stay open
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                close_inherited_listeners([port], candidates=[listening.fileno(), other.fileno(), read_end])
                closed = []
                for fd in (listening.fileno(), other.fileno(), read_end):
                    try:
                        os.fstat(fd)
                        closed.append(False)
                    except OSError:
                        closed.append(True)
                code = 0 if closed == [True, False, False] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.fstat(listening.fileno())  # the notebook's own copy is untouched
    finally:
        listening.close()
        other.close()
        os.close(read_end)
        os.close(write_end)


def _logs_a_line(fabric):
    logging.getLogger("notebook-fabric-test-issue-19").warning("logged on rank %d", fabric.global_rank)
    return fabric.global_rank


def test_a_notebook_logging_handler_writes_into_the_ranks_captured_stream():
    logger = logging.getLogger("notebook-fabric-test-issue-19")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.propagate = False
    sink = RecordingSink()
    try:
        assert launch(_logs_a_line, accelerator="cpu", devices=2, start_method="fork", sink=sink) == 0
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    seen = "".join(e.text for e in sink.events if isinstance(e, Output) and e.stream == "stderr")
    assert "logged on rank 0" in seen and "logged on rank 1" in seen


def _crashes_on_its_way_out(fabric, delay):
    if fabric.global_rank == 1:  # the rank's last step before leaving segfaults, `delay` s after its value was queued
        fabric._finalize_loggers = lambda status: (time.sleep(delay), os.kill(os.getpid(), signal.SIGSEGV))
    return fabric.global_rank


@pytest.mark.parametrize("delay", [0.0, 0.5])  # 0.5 s: its value has reached the notebook before it crashes
def test_a_rank_that_crashes_on_its_way_out_is_reported_and_its_logs_kept(delay, capsys):
    with pytest.raises(RankDiedError, match="rank 1 killed by signal SIGSEGV") as caught:
        launch(_crashes_on_its_way_out, delay, accelerator="cpu", devices=2, start_method="fork")
    assert caught.value.rank == 1
    captured = capsys.readouterr()
    assert "per-rank logs (complete stdout and stderr)" in captured.out + captured.err
