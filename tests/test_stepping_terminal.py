"""Stepping into a rank of ``launch(fn)`` run in a terminal (a pty): the prompt is the terminal's.

Every test asserts that no process of the script survives it.
"""
from __future__ import annotations

import sys
import time
import uuid

import pytest

from conftest import SCRIPTS, _kill, _marked_processes, _wait_gone, script_environment

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.timeout(240)
SCRIPT = SCRIPTS / "stepping_terminal.py"


def start(tmp_path, *args: str):
    marker = uuid.uuid4().hex
    child = pexpect.spawn(sys.executable, [str(SCRIPT), *args], cwd=str(tmp_path), env=script_environment(marker),
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    return child, marker


def finish(child, marker: str) -> str:
    """Wait for the script to end; what it printed last. Fails if one of its processes survives."""
    child.expect(pexpect.EOF)
    child.close()
    survivors = _wait_gone(marker, grace=10.0)
    if survivors:
        _kill(survivors)
    assert survivors == [], "processes of the script survived it"
    return child.before


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_breakpoint_in_a_rank_is_answered_from_the_terminal(tmp_path, method: str) -> None:
    child, marker = start(tmp_path, method)
    try:
        child.expect_exact("(Pdb rank 1) ")
        seen = child.before
        assert "[rank 1] -> total = fabric.all_reduce" in seen
        time.sleep(4.0)  # past stall=1 and timeout=3 of the launch
        child.sendline("p x")
        child.expect_exact("[rank 1] 41")
        seen += child.before
        child.expect_exact("(Pdb rank 1) ")
        child.sendline("c")
        child.expect_exact("RESULT 81.0")
        seen += child.before
    finally:
        rest = finish(child, marker)
    assert child.exitstatus == 0, rest
    assert "rank 0 waits for rank 1 (in the debugger) in all_reduce #1 (float32[1])" in seen + rest
    assert "stall" not in seen + rest and "Timeout" not in seen + rest


def test_ctrl_c_at_the_prompt_ends_the_launch_cleanly(tmp_path) -> None:
    child, marker = start(tmp_path, "fork")
    try:
        child.expect_exact("(Pdb rank 1) ")
        child.sendintr()
        child.expect_exact("KeyboardInterrupt")
    finally:
        finish(child, marker)
    assert child.exitstatus != 0 or child.signalstatus is not None
    assert _marked_processes(marker) == []


def test_post_mortem_from_the_terminal(tmp_path) -> None:
    child, marker = start(tmp_path, "fork", "post-mortem")
    try:
        child.expect_exact("(Pdb rank 1) ")
        assert "[rank 1] post-mortem of ValueError: bad scale" in child.before
        child.sendline("p scale")
        child.expect_exact("[rank 1] 8")
        child.expect_exact("(Pdb rank 1) ")
        child.sendline("c")
        child.expect_exact("ValueError: bad scale")
    finally:
        finish(child, marker)
    assert child.exitstatus == 1


def test_post_mortem_without_a_terminal_raises_the_failure_itself(tmp_path) -> None:
    """stdin at its end (``< /dev/null``): pdb reads EOF and quits; the rank's own error is raised."""
    import subprocess

    marker = uuid.uuid4().hex
    done = subprocess.run([sys.executable, str(SCRIPT), "fork", "post-mortem"], cwd=str(tmp_path),
                          env=script_environment(marker), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    survivors = _wait_gone(marker, grace=10.0)
    _kill(survivors)
    assert survivors == []
    assert done.returncode == 1 and "ValueError: bad scale" in done.stderr, done.stderr
