"""The hosts of a Slurm pool: the allocation the kernel runs in, or one the notebook asks for and holds.

An allocation of our own is an ``salloc`` whose command is a tiny holder on this machine that
waits for its stdin to close: the pool closes it at the end, and so does the kernel's death (even
SIGKILL), after which salloc gives the nodes back. Nothing of ours runs on a node but the ranks.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from ..environments.slurm import parse_node_list
from .spec import Slurm

SLURM_TOOLS = ("salloc", "srun", "scancel", "squeue", "sinfo")
JOB_NAME = "notebook-fabric"
_HOLDER = "import sys; sys.stdin.buffer.read()"  # returns when the notebook closes the pipe (or dies)
_GRANTED = re.compile(r"Granted job allocation (\d+)")
_QUEUED = re.compile(r"(?:Pending|Granted) job allocation (\d+)")


class SlurmError(RuntimeError):
    """Slurm could not give the pool its hosts (the message quotes Slurm and names the fix)."""


def check_tools() -> None:
    """``SlurmError`` unless Slurm's commands are on PATH."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        raise SlurmError(f"cluster='slurm' needs Slurm's commands on PATH, and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not there: run the notebook on a login node of a "
                         "Slurm cluster (or in a job there), or leave cluster= out to run the ranks on this machine")


def slurm(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


@dataclass
class Allocation:
    """A Slurm job whose first ``len(hosts)`` hosts the pool uses; ``owned`` when the notebook made it."""

    job_id: str
    hosts: List[str]
    owned: bool
    holder: Optional[subprocess.Popen] = None
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Give an allocation of our own back (cancel it, end its holder). Idempotent."""
        if self._released or not self.owned:
            return
        self._released = True
        slurm("scancel", self.job_id)
        if self.holder is not None:
            _end(self.holder)


def current_allocation(num_nodes: int, tasks_per_node: int = 1) -> Optional[Allocation]:
    """The allocation this kernel runs in (``SLURM_JOB_ID`` set), checked to have ``num_nodes`` hosts
    with a CPU for each of ``tasks_per_node`` ranks."""
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not job_id:
        return None
    node_list = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    hosts = parse_node_list(node_list) if node_list else []
    if len(hosts) < num_nodes:
        raise SlurmError(f"num_nodes={num_nodes}, but this kernel's Slurm job {job_id} has {len(hosts)} node(s)"
                         f" ({node_list!r}): request --nodes={num_nodes} for the notebook's job, or pass num_nodes="
                         f"{len(hosts)}")
    cpus = parse_cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ""))[:num_nodes]
    if len(cpus) == num_nodes and min(cpus) < tasks_per_node:
        raise SlurmError(f"devices={tasks_per_node} ranks per host, but this kernel's Slurm job {job_id} holds"
                         f" {_cpu_counts(cpus)} on its first {num_nodes} node(s) (one per rank): pass devices="
                         f"{min(cpus)} or less, or request more CPUs per node for the notebook's job")
    return Allocation(job_id=job_id, hosts=hosts[:num_nodes], owned=False)


def parse_cpus_per_node(text: str) -> List[int]:
    """``SLURM_JOB_CPUS_PER_NODE`` (``"4(x2),2"``) as one count per node (``[4, 4, 2]``); ``[]`` if unreadable."""
    counts: List[int] = []
    for part in filter(None, text.replace(" ", "").split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if match is None:
            return []
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _cpu_counts(cpus: List[int]) -> str:
    kinds = sorted(set(cpus))
    return f"{kinds[0]} CPU(s) each" if len(kinds) == 1 else f"{kinds[0]}-{kinds[-1]} CPUs per node"


def partition_nodes() -> "tuple[Dict[str, List[int]], Optional[str]]":
    """``({partition: [CPUs of each node]}, default partition)`` from ``sinfo``."""
    out = slurm("sinfo", "-h", "-N", "-o", "%N %P %c")
    if out.returncode != 0:
        raise SlurmError(f"sinfo fails, so Slurm cannot be asked for nodes: {out.stderr.strip()}")
    nodes: Dict[str, List[int]] = {}
    default = None
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        name, cpus = parts[1], int(parts[2].rstrip("+"))
        if name.endswith("*"):
            name = default = name[:-1]
        nodes.setdefault(name, []).append(cpus)
    return nodes, default


def check_request(spec: Slurm, num_nodes: int, tasks_per_node: int = 1) -> None:
    """Refuse, before anything is queued, an unknown partition, more nodes than the partition has, or
    more ranks per node than its nodes have CPUs (each rank is a Slurm task of one CPU)."""
    nodes, default = partition_nodes()
    partition = spec.partition or default
    if spec.partition is not None and spec.partition not in nodes:
        raise SlurmError(f"Slurm has no partition {spec.partition!r}; its partitions are "
                         f"{', '.join(sorted(nodes)) or '(none)'}: pass Slurm(partition=...) with one of them")
    if partition is None:
        return
    cpus = sorted(nodes.get(partition, []), reverse=True)
    if num_nodes > len(cpus):
        raise SlurmError(f"num_nodes={num_nodes}, but Slurm's partition {partition!r} has {len(cpus)} "
                         f"node(s): ask for at most {len(cpus)}, or choose a larger partition")
    if cpus[num_nodes - 1] < tasks_per_node:
        raise SlurmError(f"devices={tasks_per_node} ranks per host, but the nodes of Slurm's partition {partition!r}"
                         f" have {_cpu_counts(cpus)} (each rank is a task of one CPU): ask for at most {cpus[num_nodes - 1]}"
                         f" per host on {num_nodes} node(s), or choose a partition with larger nodes")


def request_allocation(spec: Slurm, num_nodes: int, tasks_per_node: int,
                       notify: Callable[[str], None] = lambda text: None) -> Allocation:
    """Ask Slurm for ``num_nodes`` hosts (``salloc``) and wait up to ``spec.start_timeout`` for them."""
    check_request(spec, num_nodes, tasks_per_node)
    command = ["salloc", f"--nodes={num_nodes}", f"--ntasks-per-node={tasks_per_node}", f"--job-name={JOB_NAME}",
               *spec.allocation_options(), "--", sys.executable, "-c", _HOLDER]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env, start_new_session=True, text=True)
    lines: List[str] = []
    threading.Thread(target=_collect, args=(holder, lines), name="notebook-fabric salloc", daemon=True).start()
    try:
        job_id = _wait_granted(holder, lines, command, spec, num_nodes, notify)
    except BaseException:  # refused, timed out, or the kernel interrupted: nothing may stay queued
        queued = _QUEUED.search("\n".join(lines))
        if queued:
            slurm("scancel", queued.group(1))
        _end(holder)
        raise
    hosts_text = slurm("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip()
    try:
        hosts = parse_node_list(hosts_text)
    except ValueError:
        slurm("scancel", job_id)
        _end(holder)
        raise SlurmError(f"Slurm granted job {job_id} but squeue names no hosts for it ({hosts_text!r})") from None
    return Allocation(job_id=job_id, hosts=hosts, owned=True, holder=holder)


def _wait_granted(holder: subprocess.Popen, lines: List[str], command: List[str], spec: Slurm, num_nodes: int,
                  notify: Callable[[str], None]) -> str:
    """The job id once salloc says the allocation is granted; ``SlurmError`` if it refuses or stays pending."""
    deadline = time.monotonic() + spec.start_timeout
    job_id = None
    noted_pending = False
    while True:
        text = "\n".join(lines)
        granted = _GRANTED.search(text)
        queued = _QUEUED.search(text)
        job_id = job_id or (queued.group(1) if queued else None)
        if granted:
            break
        if holder.poll() is not None:
            time.sleep(0.1)  # its last lines
            said = "\n".join(line for line in lines if line.strip()) or f"salloc exited with code {holder.returncode}"
            raise SlurmError(f"Slurm refused the allocation of {num_nodes} node(s) ({' '.join(command[1:-4])}):\n{said}")
        if job_id and not noted_pending and "queued and waiting" in text:
            noted_pending = True
            notify(f"Slurm job {job_id} is pending ({_pending_reason(job_id)}); waiting up to {spec.start_timeout:g} s")
        if time.monotonic() > deadline:
            reason = _pending_reason(job_id) if job_id else "no job id yet"
            raise SlurmError(f"Slurm job {job_id} was still pending after start_timeout={spec.start_timeout:g} s "
                             f"(Slurm's reason: {reason}); it was cancelled. Ask for fewer nodes or another partition, "
                             "or allow longer with Slurm(start_timeout=...)")
        time.sleep(0.05)
    return job_id


def _pending_reason(job_id: str) -> str:
    out = slurm("squeue", "-h", "-j", job_id, "-o", "%r")
    return out.stdout.strip() or "unknown"


def _collect(process: subprocess.Popen, lines: List[str]) -> None:
    for line in process.stderr:
        lines.append(line.rstrip("\n"))


def _end(process: subprocess.Popen) -> None:
    """Close the holder's stdin (it exits, salloc gives the nodes back); kill salloc if it lingers."""
    try:
        if process.stdin is not None:
            process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
