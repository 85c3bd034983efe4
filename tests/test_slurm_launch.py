"""launch(fn, num_nodes=2, cluster="slurm") on the two-host Slurm test bed: results from both hosts,
errors that name rank and host, deaths within seconds, clear refusals; never a job or a rank left."""
from __future__ import annotations

import json
from typing import Iterator

import pytest

from conftest import SCRIPTS
from support import slurm_bed

pytestmark = pytest.mark.skipif(slurm_bed.why_no_bed() is not None, reason=slurm_bed.why_no_bed() or "")
SCRIPT = SCRIPTS / "slurm_launch.py"


@pytest.fixture
def bed() -> Iterator[None]:
    """The bed up and idle before the test; no job in squeue and no process on a node after it."""
    slurm_bed.bring_up()
    yield
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()


@pytest.mark.parametrize("per_host", [1, 2])
def test_results_come_from_both_hosts(bed, run_script, per_host: int) -> None:
    result = run_script(SCRIPT, "results", per_host, timeout=240)
    values = result.check("results")[0]["values"]
    world = 2 * per_host
    assert [v["rank"] for v in values] == list(range(world))
    hosts = [v["host"] for v in values]
    assert hosts == ["nfnode1"] * per_host + ["nfnode2"] * per_host, result.describe()
    assert {v["sum"] for v in values} == {float(sum(range(1, world + 1)))}  # one all_reduce across both hosts
    assert {v["ifname"] for v in values} == {"nf0"} and {v["world"] for v in values} == {world}


def test_inside_an_allocation_the_ranks_are_a_step_of_it(bed, run_script) -> None:
    result = run_script(SCRIPT, "in-allocation", timeout=240)
    record = result.check("results")[0]
    assert record["job"], "the script ran as salloc's command, inside the job"
    assert [v["host"] for v in record["values"]] == ["nfnode1", "nfnode1", "nfnode2", "nfnode2"], result.describe()
    assert "Granted job allocation" in result.stderr and result.stderr.count("Granted job allocation") == 1  # no second job


def test_an_exception_names_rank_and_host_with_its_traceback(bed, run_script) -> None:
    record = run_script(SCRIPT, "exception", timeout=240).check("exception")[0]
    assert record["type"] == "ValueError" and record["rank_attr"] == 1
    assert "bad value on nfnode2" in record["message"]
    assert any("rank 1 on host nfnode2" in note for note in record["notes"]), record
    assert "Traceback on rank 1 on host nfnode2" in record["cause"] and "fails_on_rank_1" in record["cause"]


@pytest.mark.parametrize("how", ["kill-rank", "kill-node", "lose-silent"])
def test_a_killed_rank_or_a_lost_host_ends_in_rank_died_error(bed, run_script, tmp_path, how: str) -> None:
    """kill-node: every process of nfnode2 killed, slurmd too (the sockets close); lose-silent: nfnode2's slurmd
    killed and the node cut off the network, its rank left running there (nothing closes: a crashed host)."""
    try:
        record = run_script(SCRIPT, how, tmp_path, timeout=240).check(how)[0]
    finally:
        if how != "kill-rank":
            slurm_bed.reconnect_node("nfnode2")
            slurm_bed.bring_up()  # slurmd back on nfnode2; the job there can complete
    assert record["type"] == "RankDiedError" and record["ranks"] == [1], record
    assert "rank 1" in record["message"] and "on host nfnode2" in record["message"]
    if how == "kill-rank":
        assert "SIGKILL" in record["message"]
    else:
        assert "lost" in record["message"]
    assert record["seconds"] < 10, record


@pytest.mark.parametrize("spec, expected", [
    ({"partition": "nosuch"}, r"no partition 'nosuch'; its partitions are nf"),
    ({"num_nodes": 3}, r"num_nodes=3, but Slurm's partition 'nf' has 2 node\(s\)"),
    ({"sbatch_args": ["--begin=now+3600"], "start_timeout": 3}, r"still pending after start_timeout=3 s \(Slurm's reason: BeginTime\)"),
])
def test_bad_requests_are_refused_clearly_and_nothing_stays_queued(bed, run_script, spec, expected) -> None:
    import re

    record = run_script(SCRIPT, "bad", json.dumps(spec), timeout=120).check("bad")[0]
    assert record["type"] == "SlurmError", record
    assert re.search(expected, record["message"]), record["message"]
    assert slurm_bed.jobs() == [] or record["seconds"] >= 0  # the fixture asserts squeue empty within 15 s


@pytest.mark.parametrize("given, error, expected", [
    ({"strategy": "nonsense"}, "ValueError", r"strategy='nonsense' is not known\. Choose one of \['auto', .*'ddp'"),
    ({"precision": "12-bit"}, "ValueError", r"precision='12-bit' is not supported\. Choose one of"),
    ({"accelerator": "abacus"}, "ValueError", r"accelerator='abacus' is not known\. Choose one of"),
    ({"strategy": "single_device"}, "ValueError", r"runs on one device, but the cluster would start 2 ranks"),
    ({"precison": "bf16-mixed"}, "TypeError", r"Fabric\(\) takes no argument 'precison'"),
    ({"devices": 5, "accelerator": "cpu"}, "SlurmError",
     r"devices=5 ranks per host, but the nodes of Slurm's partition 'nf' have 4 CPU\(s\) each .*at most 4 per host"),
    ({"devices": 2, "accelerator": "cuda", "cluster_gpus": 1}, "ValueError", r"Slurm\(gpus_per_node=1\)"),
    ({"unpicklable": True, "accelerator": "cpu"}, "UnpicklableError",
     r"the function .*function .* cannot be sent to the ranks on the cluster.s hosts: .*cannot pickle"),
])
def test_bad_fabric_arguments_fail_before_slurm_is_asked_for_anything(bed, run_script, given, error, expected) -> None:
    import re

    asked_before = slurm_bed.allocation_requests()
    record = run_script(SCRIPT, "bad-fabric", json.dumps(given), timeout=120).check("bad-fabric")[0]
    assert record["type"] == error, record
    assert re.search(expected, record["message"]), record["message"]
    assert record["seconds"] < 5, record
    assert slurm_bed.allocation_requests() == asked_before, "Slurm was asked for an allocation before the check"
    assert slurm_bed.jobs() == []


def test_an_interrupt_while_the_allocation_is_pending_cancels_it(bed, run_script) -> None:
    record = run_script(SCRIPT, "interrupt-pending", timeout=120).check("interrupt-pending")[0]
    assert record["jobs"].strip() == "", record  # nothing pending or running once launch() has raised


def test_without_slurm_tools_the_error_says_so(run_script, tmp_path) -> None:
    record = run_script(SCRIPT, "bad", json.dumps({}), env={"PATH": "/nonexistent"}, timeout=120).check("bad")[0]
    assert record["type"] == "SlurmError"
    assert "needs Slurm's commands on PATH" in record["message"] and "salloc" in record["message"]


def test_ranks_that_cannot_reach_the_notebook_name_the_interface_tried(bed, run_script) -> None:
    record = run_script(SCRIPT, "unreachable", timeout=240).check("unreachable")[0]
    assert record["type"] == "RankDiedError", record
    assert "could not connect to the notebook at 127.0.0.1" in record["message"], record["message"]
    assert "(interface lo)" in record["message"] and "Slurm(interface=...)" in record["message"]



def test_a_slurmd_that_stays_dead_ends_in_rank_died_error_once_slurm_declares_its_node_failed(bed, run_script,
                                                                                             tmp_path) -> None:
    import re
    import subprocess

    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    slurmd_timeout = int(re.search(r"SlurmdTimeout\s*=\s*(\d+)", config).group(1))
    try:
        record = run_script(SCRIPT, "kill-slurmd", tmp_path, timeout=240).check("kill-slurmd")[0]
    finally:
        slurm_bed.bring_up()  # slurmd back: nfnode2 returns to service
    assert record["type"] == "RankDiedError" and 1 in record["ranks"], record
    assert "rank 1 was lost with host nfnode2: Slurm declared the node failed" in record["message"], record
    assert record["seconds"] < slurmd_timeout + 15, record  # Slurm's verdict, then at once


def test_a_restarted_slurmd_does_not_end_the_ranks_of_its_node(bed, run_script) -> None:
    """slurmd is Slurm's node daemon, not the ranks' parent: administrators restart it under running jobs, and
    the ranks of its node go on (a lost node is one whose host stops answering: the test above)."""
    record = run_script(SCRIPT, "slurmd-restart", timeout=240).check("slurmd-restart")[0]
    assert record["killed"], record
    assert [v["host"] for v in record["values"]] == ["nfnode1", "nfnode2"], record
    assert record["values"][0]["count"] == record["values"][1]["count"] > 20, record  # all_reduces went on throughout


def test_a_certain_hang_across_hosts_names_rank_and_host_in_the_message_and_the_ledger(bed, run_script, tmp_path):
    record = run_script(SCRIPT, "hang", tmp_path, timeout=240).check("hang")[0]
    assert record["type"] == "CollectiveHangError", record
    assert "rank 0 on host nfnode1 waits in all_reduce #2 (float32[3]" in record["message"], record["message"]
    assert "rank 1 on host nfnode2 finished the function without calling it" in record["message"]
    assert record["seconds"] < 10, record  # from rank 1's return to the error in the notebook
    for table in (record["ledger"], record["last_ledger"]):  # CollectiveHangError.ledger() and last_ledger()
        heading = table.splitlines()[0]
        assert "rank 0 @ nfnode1" in heading and "rank 1 @ nfnode2" in heading, table
        assert ">> world     #2 | all_reduce float32[3]" in table, table


def test_a_stall_across_hosts_names_rank_and_host_and_an_interrupt_ends_it(bed, run_script, tmp_path):
    result = run_script(SCRIPT, "stall", tmp_path, timeout=240)
    record = result.check("stall")[0]
    assert "stall: rank 0 on host nfnode1 has waited in all_reduce #1 (float32[3])" in result.stderr, result.describe()
    assert "rank 1 on host nfnode2 is not in that collective" in result.stderr, result.describe()
    assert "time.sleep(60)" in result.stderr  # rank 1's stack, asked of it on its host
    assert record["type"] == "KeyboardInterrupt" and record["seconds"] < 10, record  # from the interrupt on
    assert "rank 0 @ nfnode1" in record["last_ledger"].splitlines()[0], record["last_ledger"]


def test_mismatched_collectives_across_hosts_name_each_rank_s_host(bed, run_script, tmp_path):
    record = run_script(SCRIPT, "mismatch", tmp_path, timeout=240).check("mismatch")[0]
    assert record["type"] == "CollectiveMismatchError", record
    assert "rank 0 on host nfnode1: #1 all_reduce(float32[3])" in record["message"], record["message"]
    assert "rank 1 on host nfnode2: #1 broadcast(float32[3]) src=0" in record["message"], record["message"]
    assert any("raised on rank 0 on host nfnode1 and rank 1 on host nfnode2" in note for note in record["notes"]), record
    assert record["seconds"] < 10, record
