"""The Slurm pieces that need no cluster: ``cluster=`` and ``Slurm(...)`` checks, srun's end lines, and
the message for several nodes from a notebook without a cluster."""
from __future__ import annotations

import pytest

from notebook_fabric import Slurm
from notebook_fabric.clusters.slurm_step import LOST, _exit_code_of, _task_numbers
from notebook_fabric.clusters.spec import resolve_cluster


def test_cluster_names_and_bad_values() -> None:
    assert resolve_cluster(None) is None and resolve_cluster("local") is None
    assert resolve_cluster("slurm") == Slurm()
    spec = Slurm(partition="gpu", time="02:00:00", account="proj", gpus_per_node=4, sbatch_args=["--qos=debug"])
    assert resolve_cluster(spec) is spec
    assert spec.allocation_options() == ("--partition=gpu", "--time=02:00:00", "--account=proj", "--gpus-per-node=4",
                                         "--qos=debug")
    with pytest.raises(ValueError, match=r"cluster='k8s' is not known: use one of 'local', 'slurm'"):
        resolve_cluster("k8s")
    with pytest.raises(ValueError, match=r"start_timeout=\) must be a positive number"):
        Slurm(start_timeout=0)
    with pytest.raises(ValueError, match=r"partition=\) must be a non-empty string"):
        Slurm(partition="")


def test_srun_end_lines() -> None:
    assert _task_numbers("1") == [1] and _task_numbers("0-2,5") == [0, 1, 2, 5]
    assert _exit_code_of("Killed") == -9 and _exit_code_of("Exited with exit code 3") == 3
    assert _exit_code_of("Segmentation fault (core dumped)") == -11 and _exit_code_of("something else") == LOST


def test_launch_refuses_a_fork_start_method_on_a_cluster_before_asking_slurm() -> None:
    from notebook_fabric import launch

    with pytest.raises(ValueError, match=r"start_method='fork' does not apply there"):
        launch(lambda fabric: 0, devices=1, num_nodes=2, cluster="slurm", start_method="fork", accelerator="cpu")


def test_fabric_launch_over_several_nodes_in_a_notebook_says_to_name_the_cluster(tmp_path) -> None:
    import subprocess
    import sys

    code = ("from notebook_fabric import Fabric\n"
            "try:\n"
            "    Fabric(accelerator='cpu', strategy='ddp', devices=2, num_nodes=2).launch(lambda fabric: 0)\n"
            "except RuntimeError as error:\n"
            "    print('ERROR', error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "ERROR Fabric(num_nodes=2).launch(fn) here has no script" in out.stdout, out.stdout + out.stderr
    assert "cluster='slurm'" in out.stdout and "--num-nodes 2 --cluster slurm" in out.stdout


def test_slurm_cpus_per_node_is_read_per_node() -> None:
    from notebook_fabric.clusters.slurm_allocation import parse_cpus_per_node

    assert parse_cpus_per_node("4(x2),2") == [4, 4, 2] and parse_cpus_per_node("8") == [8]
    assert parse_cpus_per_node("") == [] and parse_cpus_per_node("odd") == []


def test_inside_a_job_the_fabric_arguments_are_judged_without_the_job_s_environment(monkeypatch) -> None:
    """A Fabric built here would detect this one-node job and judge num_nodes=2 by it; the check does not."""
    from notebook_fabric.clusters.fabric_check import check_fabric_arguments
    from notebook_fabric.clusters.slurm_allocation import SlurmError, current_allocation

    for name, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "nfnode[1-2]", "SLURM_NTASKS": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "2",
                        "SLURM_JOB_CPUS_PER_NODE": "1(x2)"}.items():
        monkeypatch.setenv(name, value)
    check_fabric_arguments({"accelerator": "cpu", "strategy": "ddp", "devices": 1, "num_nodes": 2}, 2)
    with pytest.raises(ValueError, match=r"strategy='nonsense' is not known"):
        check_fabric_arguments({"strategy": "nonsense", "num_nodes": 2}, 2)
    assert current_allocation(2, 1).hosts == ["nfnode1", "nfnode2"]
    with pytest.raises(SlurmError, match=r"devices=2 ranks per host, but this kernel's Slurm job 77 holds 1 CPU\(s\)"):
        current_allocation(2, 2)


def test_ranks_and_ledger_columns_name_their_hosts_only_where_ranks_have_hosts() -> None:
    from notebook_fabric.collectives.ledger import LedgerEntry
    from notebook_fabric.collectives.ledger_view import LedgerTable
    from notebook_fabric.live.ranks import format_ranks_on

    assert format_ranks_on([0, 1], {}) == "ranks 0-1" and format_ranks_on([1], None) == "rank 1"
    hosts = {0: "nfnode1", 1: "nfnode1", 2: "nfnode2"}
    assert format_ranks_on([1], hosts) == "rank 1 on host nfnode1"
    assert format_ranks_on([0, 1, 2], hosts) == "ranks 0-1 on host nfnode1 and rank 2 on host nfnode2"
    entry = LedgerEntry(seq=1, last_seq=1, op="all_reduce", group="0", group_ranks=(0, 1), shapes=((2,),),
                        dtypes=("float32",), reduce_op="sum", src=None, name=None, state="finished", origin="fabric",
                        place=None, started_ns=0)
    on_hosts = str(LedgerTable({0: [entry], 1: [entry]}, hosts={0: "nfnode1", 1: "nfnode2"})).splitlines()[0]
    assert "rank 0 @ nfnode1" in on_hosts and "rank 1 @ nfnode2" in on_hosts
    assert "@" not in str(LedgerTable({0: [entry], 1: [entry]})).splitlines()[0]  # one machine: no host
