"""The two-host Slurm test bed itself: up is idempotent, jobs span both hosts with their own
addresses under one interface name, and down leaves nothing running."""
from __future__ import annotations

import subprocess

import psutil
import pytest

from support import slurm_bed

pytestmark = pytest.mark.skipif(slurm_bed.why_no_bed() is not None, reason=slurm_bed.why_no_bed() or "")


def _slurm_daemons() -> list:
    names = {"slurmctld", "slurmd", "slurmstepd", "munged"}
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in names]


def test_up_is_idempotent_and_a_job_spans_both_hosts() -> None:
    was_up = slurm_bed.is_up()
    slurm_bed.bring_up()
    slurm_bed.bring_up()  # a second `up` changes nothing
    out = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=2", "sh", "-c",
         'echo "$SLURM_PROCID $(hostname) $(ip -4 -o addr show nf0 | awk \'{print $4}\')"'],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split() for line in out.stdout.splitlines())
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    hosts = {r[1]: r[2].split("/")[0] for r in rows}
    assert hosts == slurm_bed.NODE_ADDRESSES  # each host its own name and address, on nf0
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()
    if not was_up:
        _down_and_check()


def _down_and_check() -> None:
    hosts_before = open("/etc/hosts").read()
    assert "nfnode1" in hosts_before
    done = slurm_bed.bed("down")
    assert done.returncode == 0, done.stderr
    assert not _slurm_daemons(), f"still running after down: {_slurm_daemons()}"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "nfnode" not in namespaces
    assert "nfnode1" not in open("/etc/hosts").read()
    assert slurm_bed.bed("status").returncode != 0
    assert slurm_bed.bed("down").returncode == 0  # down twice is fine too


def test_down_leaves_nothing_and_up_comes_back() -> None:
    slurm_bed.bring_up()
    _down_and_check()
    slurm_bed.bring_up()
    slurm_bed.wait_nodes_idle()
