"""A process killed in the middle of a save: the previous checkpoint stays intact, and the next save
to that path removes the temporary file it left (but never one a save in progress is writing)."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from support.processes import wait_no_children
from notebook_fabric import Fabric
from support.waiting import poll

pytestmark = pytest.mark.timeout(180)

SAVER = textwrap.dedent("""
    import sys, torch
    from notebook_fabric import Fabric
    fabric = Fabric(accelerator="cpu", devices=1)
    path = sys.argv[1]
    fabric.save(path, {"version": 0, "weights": torch.full((4,), 7.0)})
    print("first saved", flush=True)
    big = torch.ones(64 * 1024 * 1024)  # 256 MB: long enough a write to be killed in the middle of
    version = 1
    while True:
        fabric.save(path, {"version": version, "weights": big})
        version += 1
""")


def partials(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.partial"))


def test_sigkill_mid_save_then_save_and_load(tmp_path, clean_environment):
    target = tmp_path / "ck.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline().strip() == "first saved"
        # a temporary file that is being written: kill its writer now
        poll(lambda: any(p.exists() and p.stat().st_size > 1_000_000 for p in partials(tmp_path, target.name)), 60,
             interval=0.002)
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=10)
    finally:
        if saver.poll() is None:
            saver.kill()
            saver.wait()
    assert saver.returncode == -signal.SIGKILL
    assert wait_no_children() == []
    left = partials(tmp_path, target.name)
    assert len(left) == 1 and left[0].stat().st_size > 1_000_000, "the kill did not land mid-save"

    fabric = Fabric(accelerator="cpu", devices=1)
    previous = fabric.load(target)  # the last complete checkpoint, whole
    assert set(previous) == {"version", "weights"}
    assert previous["weights"].numel() in (4, 64 * 1024 * 1024)

    fabric.save(target, {"version": "new", "weights": torch.zeros(3)})
    assert partials(tmp_path, target.name) == []
    loaded = fabric.load(target)
    assert loaded["version"] == "new" and loaded["weights"].tolist() == [0.0, 0.0, 0.0]


def test_a_save_in_progress_keeps_its_temporary_file(tmp_path):
    target = tmp_path / "ck.pt"
    in_progress = tmp_path / f".{target.name}.abc123.partial"  # as another process's running save holds it
    with open(in_progress, "wb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.write(b"half a checkpoint")
        handle.flush()
        other_target = tmp_path / ".ck.pt.other.partial.keep"  # not a temporary file of this target
        other_target.write_bytes(b"x")
        Fabric(accelerator="cpu", devices=1).save(target, {"a": torch.ones(2)})
        assert in_progress.exists() and other_target.exists()
    Fabric(accelerator="cpu", devices=1).save(target, {"a": torch.ones(2)})  # its writer is gone now
    assert not in_progress.exists() and other_target.exists()
