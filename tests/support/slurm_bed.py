"""The two-host Slurm test bed (``scripts/slurm_testbed.sh``) for tests: bring it up, check it is clean.

Tests that need it use the ``slurm_bed`` fixture (tests/test_slurm_*.py): it skips, saying why,
only where root or network namespaces are missing, and otherwise starts the bed (installing
Slurm if needed). ``assert_no_jobs`` and ``rank_processes`` are the after-test checks: no job of
ours in ``squeue``, no rank process left on any node.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import List, Optional

import psutil

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_testbed.sh"
NODES = ("nfnode1", "nfnode2")
NODE_ADDRESSES = {"nfnode1": "10.77.0.11", "nfnode2": "10.77.0.12"}
LOGIN_ADDRESS = "10.77.0.1"


def why_no_bed() -> Optional[str]:
    """The reason the bed cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "the Slurm test bed needs root (network namespaces, slurmd)"
    if shutil.which("ip") is None or shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "the Slurm test bed needs iproute2 (ip) and util-linux (nsenter, unshare)"
    probe = f"nfprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are not available here: ip netns add says {made.stderr.strip()!r}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def bed(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command], capture_output=True, text=True, timeout=timeout)


def is_up() -> bool:
    return bed("status", timeout=30).returncode == 0


def bring_up() -> None:
    done = bed("up")
    if done.returncode != 0:
        raise RuntimeError(f"scripts/slurm_testbed.sh up failed:\n{done.stdout}\n{done.stderr}")
    wait_nodes_idle()


NODE_LINKS = {"nfnode1": "nfv0", "nfnode2": "nfv1"}  # each node's veth end on the bridge (scripts/slurm_testbed.sh)


def reconnect_node(node: str) -> None:
    """Put ``node`` back on the network after a test cut it off (``ip link set ... down``)."""
    subprocess.run(["ip", "link", "set", NODE_LINKS[node], "up"], capture_output=True, timeout=30)


def wait_nodes_idle(timeout: float = 60.0) -> None:
    """Every node idle (a node whose slurmd a test killed comes back through ``up``)."""
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
        if all(f"{node} idle" in states for node in NODES):
            return
        time.sleep(0.2)
    raise AssertionError(f"the test bed's nodes are not idle after {timeout:g} s:\n{states}")


def jobs() -> List[str]:
    """``squeue``'s lines (job id, state, name), all users."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True, timeout=30)
    return [line for line in out.stdout.splitlines() if line.strip()]


def assert_no_jobs(timeout: float = 15.0) -> None:
    """``squeue`` empty within ``timeout`` seconds (MinJobAge is 2 s on the bed)."""
    deadline = time.monotonic() + timeout
    left = jobs()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = jobs()
    assert not left, f"jobs still in squeue {timeout:g} s after the test: {left}"


CONTROLLER_LOG = Path("/run/nf-testbed/slurmctld.log")


def allocation_requests() -> int:
    """How many allocations (salloc, srun, sbatch) slurmctld has been asked for since the bed started, from its
    log: a check that must refuse before Slurm is asked leaves this count unchanged."""
    text = CONTROLLER_LOG.read_text(errors="replace") if CONTROLLER_LOG.exists() else ""
    return sum(text.count(marker) for marker in ("_slurm_rpc_allocate_resources", "_slurm_rpc_submit_batch_job"))


def node_processes(node: str) -> List[psutil.Process]:
    """Processes running inside ``node``'s network namespace, minus slurmd itself."""
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True)
    found = []
    for pid in out.stdout.split():
        try:
            process = psutil.Process(int(pid))
            if process.name() != "slurmd" and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, ValueError):
            continue
    return found


def assert_nodes_empty(timeout: float = 15.0) -> None:
    """No process of ours (rank, slurmstepd) left on any node within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = [p for node in NODES for p in node_processes(node)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for node in NODES for p in node_processes(node)]
    described = []
    for process in left:
        try:
            described.append(f"pid {process.pid}: {' '.join(process.cmdline())}")
        except psutil.Error:
            pass
    assert not described, "processes left on the nodes:\n" + "\n".join(described)
