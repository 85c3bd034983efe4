"""The ranks of a Slurm pool: one ``srun`` job step of N tasks, and a per-rank view of it.

srun says when a task ends abnormally (``srun: error: nfnode2: task 1: Killed``), and ends itself
when every task has; a host that vanishes says nothing, so a rank whose TLS connection closes (or
fails: its host stopped acknowledging, see :func:`~.tls.watch_peer`) and whose end srun has not
reported within ``LOST_GRACE`` seconds counts as lost. When Slurm itself declares a node failed
(its slurmd did not answer for ``SlurmdTimeout``), srun says ``Node failure on nfnode2`` and Slurm
cancels the step: the ranks of that node count as lost with it, the others as cancelled because of
it. Signals go through ``scancel --signal=... JOB.STEP`` (srun's own SIGINT handling would end the
step). The bootstrap, key included, travels on srun's stdin (``--input=all``: every task reads it).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional

from ..launching.processes import describe_exit
from .slurm_allocation import Allocation, slurm

LOST_GRACE = 1.0
UNREACHABLE = 72  # a rank's exit code when it cannot connect to the notebook (launching.rank.output.Outbox)
LOST = -int(signal.SIGKILL)
_TASK_END = re.compile(r"srun: error: (\S+): tasks? ([\d,\- ]+): (.+)$")
_SIGNAL_WORDS = {"Killed": signal.SIGKILL, "Terminated": signal.SIGTERM, "Segmentation fault": signal.SIGSEGV,
                 "Aborted": signal.SIGABRT, "Bus error": signal.SIGBUS, "Interrupt": signal.SIGINT}
_EXIT_CODE = re.compile(r"Exited with exit code (\d+)")
_NODE_FAILURE = re.compile(r"srun: error: Node failure on (\S+)")


def _task_numbers(text: str) -> List[int]:
    numbers: List[int] = []
    for part in text.replace(" ", "").split(","):
        low, _, high = part.partition("-")
        numbers.extend(range(int(low), int(high or low) + 1))
    return numbers


def _exit_code_of(words: str) -> int:
    match = _EXIT_CODE.search(words)
    if match:
        return int(match.group(1))
    for word, sig in _SIGNAL_WORDS.items():
        if word in words:
            return -int(sig)
    return LOST


class SrunStep:
    """``srun`` of ``len(hosts) * per_node`` ranks in ``allocation``, block-distributed (rank r on host r // per_node)."""

    def __init__(self, allocation: Allocation, per_node: int, parcel: bytes,
                 notify: Callable[[str], None] = lambda text: None, reach: str = "the notebook") -> None:
        self.allocation = allocation
        self.hosts = list(allocation.hosts)
        self.per_node = per_node
        self.size = len(self.hosts) * per_node
        self.name = f"notebook-fabric-{uuid.uuid4().hex[:8]}"
        self._notify = notify
        self._reach = reach  # where ranks dial back to, for the message when they cannot
        self._exits: Dict[int, int] = {}
        self._reported: Dict[int, str] = {}
        self._lost: Dict[int, float] = {}
        self._failed_nodes: List[str] = []  # nodes Slurm declared failed (srun: "Node failure on NODE")
        self._lines: List[str] = []
        self._step_id: Optional[str] = None
        self._last_signal: Dict[str, float] = {}
        self._signals: List[subprocess.Popen] = []  # scancel calls under way (never waited for in the caller)
        self._lock = threading.Lock()
        command = ["srun", f"--jobid={allocation.job_id}", f"--nodes={len(self.hosts)}", f"--ntasks={self.size}",
                   f"--ntasks-per-node={per_node}", f"--nodelist={','.join(self.hosts)}", "--distribution=block",
                   "--kill-on-bad-exit=0", "--input=all", f"--job-name={self.name}", "--unbuffered"]
        if not allocation.owned:
            command.append("--overlap")  # the kernel's own step may hold the allocation's CPUs
        command += [sys.executable, "-m", "notebook_fabric.launching.rank.srun_entry"]
        env = dict(os.environ)
        if allocation.owned:
            env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        self.pid = self.process.pid
        try:
            self.process.stdin.write(parcel)
            self.process.stdin.close()
        except OSError:
            pass
        self._reader = threading.Thread(target=self._read, name="notebook-fabric srun", daemon=True)
        self._reader.start()
        # known early, so the step can still be cancelled after srun itself is gone
        threading.Thread(target=self.step_id, args=(30.0,), name="notebook-fabric step id", daemon=True).start()

    def host_of(self, rank: int) -> str:
        return self.hosts[rank // self.per_node]

    # -- ends -----------------------------------------------------------------------------------
    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            match = _TASK_END.match(line)
            if match:
                code = _exit_code_of(match.group(3))
                with self._lock:
                    for task in _task_numbers(match.group(2)):
                        self._exits.setdefault(task, code)
                        self._reported[task] = match.group(3).strip()
            elif _NODE_FAILURE.match(line):
                node = _NODE_FAILURE.match(line).group(1)
                with self._lock:
                    self._failed_nodes.append(node)
                    for task in range(self.size):
                        if self.host_of(task) == node:
                            self._exits.setdefault(task, LOST)
                            self._reported.setdefault(task, "node failure")
                self._notify(f"Slurm declared node {node} failed (its slurmd stopped answering) and cancels the step")
            elif line.strip():
                self._lines.append(line)
                if not line.startswith("srun: Force Terminated") and "Job step aborted" not in line:
                    self._notify(line)
        self.process.wait()

    def exitcode_of(self, rank: int) -> Optional[int]:
        with self._lock:
            if rank in self._exits:
                return self._exits[rank]
            lost_at = self._lost.get(rank)
        if self.process.poll() is not None and not self._reader.is_alive():
            code = self.process.returncode
            with self._lock:
                return self._exits.setdefault(rank, 0 if code == 0 or self._reported else code)
        if lost_at is not None and time.monotonic() - lost_at > LOST_GRACE:
            with self._lock:
                return self._exits.setdefault(rank, LOST)
        return None

    def connection_closed(self, rank: int) -> None:
        """The rank's TLS connection ended (the door says so): lost unless srun reports its end soon."""
        with self._lock:
            self._lost.setdefault(rank, time.monotonic())

    def describe(self, rank: int, exitcode: int) -> str:
        host = self.host_of(rank)
        with self._lock:
            reported = rank in self._reported
            lost = rank in self._lost and not reported and exitcode == LOST and self.process.poll() is None
            failed = list(self._failed_nodes)
        if host in failed:
            return (f"was lost with host {host}: Slurm declared the node failed (its slurmd stopped answering for"
                    " SlurmdTimeout) and cancelled the step")
        if lost:
            return (f"was lost on host {host}: its connection to the notebook closed, or the host stopped acknowledging"
                    " it, and Slurm reported no exit (the host went down or its network failed)")
        if failed and exitcode < 0:
            return f"{describe_exit(exitcode)} on host {host}: Slurm cancelled the step after node {failed[0]} failed"
        if exitcode == UNREACHABLE:
            return (f"could not connect to {self._reach} from host {host} (exit code {UNREACHABLE}): the host cannot reach"
                    " that address; pass the interface the nodes reach with Slurm(interface=...)")
        return f"{describe_exit(exitcode)} on host {host}"

    # -- signals --------------------------------------------------------------------------------
    def step_id(self, wait: float = 5.0) -> Optional[str]:
        """``JOB.STEP`` of this srun, looked up by its unique name."""
        deadline = time.monotonic() + wait
        while self._step_id is None and time.monotonic() < deadline and self.process.poll() is None:
            out = slurm("squeue", "-h", "-s", "-j", self.allocation.job_id, "-o", "%i %j")
            for line in out.stdout.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == self.name:
                    self._step_id = parts[0]
            if self._step_id is None:
                time.sleep(0.1)
        return self._step_id

    def signal(self, name: str) -> bool:
        """``scancel --signal=name`` the step's tasks, without waiting (slurmctld may take its
        MessageTimeout over a dead host); once per burst, as every rank of the step asks at once."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_signal.get(name, -1e9) < 0.5:
                return True
            self._last_signal[name] = now
        step = self.step_id() if self.process.poll() is None else self._step_id
        if step is None:
            return False
        self._signals.append(subprocess.Popen(["scancel", f"--signal={name}", step], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        return True

    def close(self) -> None:
        """Kill what is left of the step and reap srun."""
        if self.process.poll() is None or self._step_id is not None:
            self._last_signal.pop("KILL", None)
            self.signal("KILL")
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=3)
        self._reader.join(timeout=2)
        for call in self._signals:  # one still talking to a dead host's slurmd is of no use now
            try:
                call.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                call.kill()
                call.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class SlurmRank:
    """One rank of a :class:`SrunStep`, as a :class:`~notebook_fabric.launching.starters.RankProcess`.

    ``pid`` is srun's (this machine's) process; the rank itself runs on ``host``."""

    sentinel = None  # ends are learned from srun and the door: the supervisor polls ``exitcode``

    def __init__(self, step: SrunStep, rank: int) -> None:
        self._step = step
        self.rank = rank
        self.pid = step.pid
        self.host = step.host_of(rank)

    @property
    def exitcode(self) -> Optional[int]:
        return self._step.exitcode_of(self.rank)

    def describe_exit(self, exitcode: int) -> str:
        return self._step.describe(self.rank, exitcode)

    def interrupt(self) -> bool:
        return self._step.signal("INT")

    def terminate(self) -> None:
        self._step.signal("TERM")

    def kill(self) -> None:
        self._step.signal("KILL")

    def close(self) -> None:
        pass

    def last_words(self) -> str:
        return ""
