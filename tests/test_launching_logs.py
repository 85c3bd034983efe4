"""Per-rank log files: every rank's complete stdout and stderr also on disk.

``launch(fn, log_dir=...)`` and ``%%fabric --log-dir``; the default folder is temporary, removed
after a successful launch and kept (its path printed) after a failure. No process is left behind.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from support.processes import wait_no_children
from notebook_fabric import launch
from notebook_fabric.live.sinks import NullSink

pytestmark = pytest.mark.timeout(180)
LINES = 20_000


@pytest.fixture(autouse=True)
def no_rank_survives(clean_environment):
    yield
    assert wait_no_children() == []


@pytest.fixture
def private_tempdir(tmp_path, monkeypatch):
    """The launcher's temporary folders go here, so the test sees exactly what it made."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def talks_a_lot(fabric):
    import os
    import sys

    for i in range(LINES):
        print(f"rank {fabric.global_rank} line {i}")
    print(f"to stderr {fabric.global_rank}", file=sys.stderr)
    sys.stdout.flush()
    os.system(f"echo from C on {fabric.global_rank}")  # a child writing to the same descriptors
    return fabric.global_rank


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_launch_with_log_dir_writes_every_line_of_every_rank(tmp_path, capsys, start_method):
    logs = tmp_path / "logs"
    assert launch(talks_a_lot, accelerator="cpu", devices=2, log_dir=logs, start_method=start_method) == 0
    for rank in range(2):
        stdout = (logs / f"rank{rank}" / "stdout.log").read_text().splitlines()
        assert stdout[:LINES] == [f"rank {rank} line {i}" for i in range(LINES)]
        assert stdout[LINES:] == [f"from C on {rank}"]
        assert (logs / f"rank{rank}" / "stderr.log").read_text() == f"to stderr {rank}\n"
    assert f"per-rank logs (complete stdout and stderr): {logs.resolve()}" in capsys.readouterr().err


def test_the_default_folder_is_removed_after_success(private_tempdir):
    assert launch(talks_a_lot, accelerator="cpu", devices=2, sink=NullSink()) == 0
    assert list(private_tempdir.iterdir()) == []


def fails_after_talking(fabric):
    print(f"last words of {fabric.global_rank}")
    raise ValueError("bad batch")


def test_the_default_folder_is_kept_and_named_after_a_failure(private_tempdir, capsys):
    with pytest.raises(ValueError, match="bad batch"):
        launch(fails_after_talking, accelerator="cpu", devices=2)
    err = capsys.readouterr().err
    [kept] = list(private_tempdir.iterdir())
    assert f"per-rank logs (complete stdout and stderr): {kept / 'logs'}" in err
    for rank in range(2):
        assert (kept / "logs" / f"rank{rank}" / "stdout.log").read_text() == f"last words of {rank}\n"


def test_log_dir_and_timeout_are_checked_before_any_rank_starts():
    with pytest.raises(TypeError, match="log_dir must be a path"):
        launch(talks_a_lot, accelerator="cpu", devices=2, log_dir=3)
    with pytest.raises(ValueError, match="names no folder"):
        launch(talks_a_lot, accelerator="cpu", devices=2, log_dir=" ")
    for bad in (0, -1, "10"):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            launch(talks_a_lot, accelerator="cpu", devices=2, timeout=bad)
    assert wait_no_children(timeout=0) == []


def test_fabric_magic_log_dir(tmp_path):
    pytest.importorskip("ipykernel")
    from support.kernels import Kernel

    logs = tmp_path / "cell-logs"
    kernel = Kernel()
    try:
        kernel.ok("%load_ext notebook_fabric")
        # the default folder: named when the pool starts, kept after a failed cell, named again at stop
        kernel.ok("%%fabric --devices 2 --accelerator cpu\nprint('before the failure')")
        kernel.run("%%fabric\nraise ValueError('cell failed')")
        stopped = kernel.ok("%fabric stop")
        marker = "per-rank logs (complete stdout and stderr): "
        [default] = [line.split(marker, 1)[1].strip() for line in stopped.all_text.splitlines() if marker in line]
        assert (Path(default) / "rank0" / "stdout.log").read_text() == "before the failure\n"

        started = kernel.ok(f"%%fabric --devices 2 --accelerator cpu --log-dir {logs}\nprint('cell one', fabric.global_rank)")
        assert f"per-rank logs in {logs.resolve()}" in started.all_text
        kernel.ok("%%fabric\nprint('cell two', fabric.global_rank)")
        for rank in range(2):
            assert (logs / f"rank{rank}" / "stdout.log").read_text() == f"cell one {rank}\ncell two {rank}\n"
        stopped = kernel.ok("%fabric stop")
        assert str(logs.resolve()) in stopped.all_text
    finally:
        kernel.shutdown()
