"""launch() over the two-host Slurm test bed; prints NFTEST records. Usage: slurm_launch.py MODE [ARGS]."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

from notebook_fabric import Slurm, launch

TAG = "NFTEST "


def emit(**record) -> None:
    print(TAG + json.dumps(record), flush=True)


def where(fabric):
    total = fabric.all_reduce(torch.tensor([float(fabric.global_rank + 1)]), reduce_op="sum")
    return {"rank": fabric.global_rank, "host": socket.gethostname(), "sum": float(total),
            "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "world": fabric.world_size}


def fails_on_rank_1(fabric):
    if fabric.global_rank == 1:
        raise ValueError(f"bad value on {socket.gethostname()}")
    fabric.barrier()


def waits_to_die(fabric, folder):
    with open(os.path.join(folder, f"rank{fabric.global_rank}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(120)


def _entering(folder):
    """Note when this rank enters the call that cannot complete (the clock is this machine's: both "hosts" are)."""
    with open(os.path.join(folder, f"rank{int(os.environ['RANK'])}.entered"), "w") as handle:
        handle.write(repr(time.time()))


def rank_1_skips_the_all_reduce(fabric, folder):
    fabric.all_reduce(torch.ones(2), reduce_op="sum")  # both: the ledgers agree on #1
    _entering(folder)
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(3), reduce_op="sum")  # rank 1 returns: it never comes


def rank_1_is_elsewhere(fabric, folder):
    _entering(folder)
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(3), reduce_op="sum")
    else:
        time.sleep(60)


def ranks_disagree(fabric, folder):
    _entering(folder)
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(3), reduce_op="sum")
    else:
        fabric.broadcast(torch.ones(3), src=0)


def interrupt_later(folder, after, sent_at):
    """SIGINT to this process (the kernel's interrupt) ``after`` seconds once rank 0 is in its collective."""
    path = os.path.join(folder, "rank0.entered")
    while not os.path.exists(path):
        time.sleep(0.05)
    time.sleep(after)
    sent_at.append(time.time())
    os.kill(os.getpid(), signal.SIGINT)


def all_reduces_for(fabric, seconds):
    """all_reduces across both hosts for ``seconds``; how many, and the hosts they joined."""
    started, count = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        total = fabric.all_reduce(torch.ones(1), reduce_op="sum")
        assert float(total) == fabric.world_size
        count += 1
        time.sleep(0.05)
    return {"count": count, "host": socket.gethostname()}


SLURMD_PID = "/run/nf-testbed/slurmd-nfnode2.pid"
NODE2_LINK = "nfv1"  # nfnode2's veth end on the bridge (scripts/slurm_testbed.sh)


def restart_slurmd_later(killed_at: list) -> None:
    """What an administrator's slurmd restart does: slurmd on nfnode2 killed, started again 3 s later."""
    time.sleep(4.0)
    os.kill(int(open(SLURMD_PID).read()), signal.SIGKILL)
    killed_at.append(time.monotonic())
    time.sleep(3.0)
    bed_env = {k: v for k, v in os.environ.items() if k != "NF_CORE_TEST_RUN"}  # slurmd is the bed's, not this run's
    subprocess.run([os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "slurm_testbed.sh"), "up"],
                   capture_output=True, timeout=120, env=bed_env)


def _pid_when_written(path: str) -> int:
    while not os.path.exists(path) or not open(path).read().strip():
        time.sleep(0.05)
    return int(open(path).read())


def kill_later(how: str, folder: str, killed_at: list) -> None:
    """SIGKILL rank 1 (on nfnode2 with one rank per host); take nfnode2 down whole (slurmd and all); or lose
    it silently: its slurmd killed and the node cut off the network, its ranks still running there."""
    pid = _pid_when_written(os.path.join(folder, "rank1.pid"))
    time.sleep(1.0)
    killed_at.append(time.monotonic())
    if how == "rank":
        os.kill(pid, signal.SIGKILL)
        return
    if how == "slurmd":  # slurmd alone, for good: Slurm declares the node failed after SlurmdTimeout
        os.kill(int(open(SLURMD_PID).read()), signal.SIGKILL)
        return
    if how == "silent":
        os.kill(int(open(SLURMD_PID).read()), signal.SIGKILL)
        subprocess.run(["ip", "link", "set", NODE2_LINK, "down"], check=True)
        return
    pids = subprocess.run(["ip", "netns", "pids", "nfnode2"], capture_output=True, text=True).stdout.split()
    for victim in pids:
        try:
            os.kill(int(victim), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def main() -> None:
    mode = sys.argv[1]
    common = dict(accelerator="cpu", dashboard=False)
    if mode == "results":
        per_host = int(sys.argv[2])
        values = launch(where, devices=per_host, num_nodes=2, cluster="slurm", return_all=True, **common)
        emit(check="results", rank=0, values=values, job=os.environ.get("SLURM_JOB_ID"))
    elif mode == "exception":
        try:
            launch(fails_on_rank_1, devices=1, num_nodes=2, cluster="slurm", **common)
        except ValueError as error:
            notes = getattr(error, "__notes__", [])
            emit(check="exception", rank=0, type=type(error).__name__, message=str(error), rank_attr=error.rank,
                 notes=notes, cause=str(error.__cause__))
    elif mode == "slurmd-restart":
        killed_at: list = []
        threading.Thread(target=restart_slurmd_later, args=(killed_at,), daemon=True).start()
        values = launch(all_reduces_for, 12.0, devices=1, num_nodes=2, cluster="slurm", return_all=True, **common)
        emit(check=mode, rank=0, values=values, killed=bool(killed_at))
    elif mode in ("kill-rank", "kill-node", "lose-silent", "kill-slurmd"):
        folder = sys.argv[2]
        killed_at: list = []
        threading.Thread(target=kill_later, args=(mode.split("-")[1], folder, killed_at), daemon=True).start()
        try:
            launch(waits_to_die, folder, devices=1, num_nodes=2, cluster="slurm", **common)
        except Exception as error:  # noqa: BLE001 - the record says what came
            emit(check=mode, rank=0, type=type(error).__name__, message=str(error),
                 seconds=time.monotonic() - killed_at[0], ranks=getattr(error, "ranks", None))
    elif mode == "in-allocation":  # this script again, as salloc's command: the kernel-in-a-job case
        out = subprocess.run(["salloc", "-N2", "--ntasks-per-node=2", "--job-name=outer", sys.executable, __file__,
                              "results", "2"], capture_output=True, text=True, timeout=200)
        sys.stdout.write(out.stdout)
        sys.stderr.write(out.stderr)
    elif mode == "interrupt-pending":  # Ctrl-C while Slurm keeps the allocation pending
        threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            launch(where, devices=1, num_nodes=2, cluster=Slurm(sbatch_args=["--begin=now+3600"]), **common)
        except KeyboardInterrupt:
            left = subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING"], capture_output=True, text=True).stdout
            emit(check="interrupt-pending", rank=0, jobs=left)
    elif mode == "unreachable":
        try:
            launch(where, devices=1, num_nodes=2, cluster=Slurm(interface="lo"), **common)
        except Exception as error:  # noqa: BLE001
            emit(check="unreachable", rank=0, type=type(error).__name__, message=str(error))
    elif mode in ("hang", "stall", "mismatch"):  # collectives that cannot complete, across the two hosts
        folder = sys.argv[2]
        function = {"hang": rank_1_skips_the_all_reduce, "stall": rank_1_is_elsewhere, "mismatch": ranks_disagree}[mode]
        options = {"stall": dict(stall=1.5), "mismatch": dict(debug=True)}.get(mode, {})
        interrupted_at: list = []
        if mode == "stall":  # a stall is reported, not ended: the user interrupts once they have read it
            threading.Thread(target=interrupt_later, args=(folder, 6.0, interrupted_at), daemon=True).start()
        try:
            launch(function, folder, devices=1, num_nodes=2, cluster="slurm", **common, **options)
        except BaseException as error:  # noqa: BLE001 - the record says what came
            from notebook_fabric.collectives import last_ledger

            ended = time.time()
            # from the moment it could be known: the last rank's arrival, or the interrupt
            entered = max(float(open(os.path.join(folder, name)).read()) for name in os.listdir(folder))
            entered = max([entered, *interrupted_at])
            table = error.ledger() if hasattr(error, "ledger") else None
            emit(check=mode, rank=0, type=type(error).__name__, message=str(error),
                 notes=getattr(error, "__notes__", []), seconds=ended - entered,
                 ledger=str(table) if table is not None else None, last_ledger=str(last_ledger()))
    elif mode == "bad-fabric":  # Fabric arguments the ranks would refuse, or something that cannot travel
        given = json.loads(sys.argv[2])
        function = where
        if given.pop("unpicklable", False):
            lock = threading.Lock()

            def function(fabric):  # noqa: F811 - a closure over a lock: cloudpickle cannot send it
                return lock.locked()
        cluster = Slurm(gpus_per_node=given.pop("cluster_gpus")) if "cluster_gpus" in given else "slurm"
        given.setdefault("devices", 1)
        given.setdefault("num_nodes", 2)
        started = time.monotonic()
        try:
            launch(function, cluster=cluster, dashboard=False, **given)
        except Exception as error:  # noqa: BLE001
            emit(check="bad-fabric", rank=0, type=type(error).__name__, message=str(error),
                 seconds=time.monotonic() - started)
    elif mode == "bad":
        spec = json.loads(sys.argv[2])
        num_nodes = spec.pop("num_nodes", 2)
        started = time.monotonic()
        try:
            launch(where, devices=1, num_nodes=num_nodes, cluster=Slurm(**spec), **common)
        except Exception as error:  # noqa: BLE001
            emit(check="bad", rank=0, type=type(error).__name__, message=str(error),
                 seconds=time.monotonic() - started)


if __name__ == "__main__":
    main()
