"""Cluster environments built from the variables a scheduler would set (set here by the test)."""
from __future__ import annotations

import os

import pytest

from notebook_fabric.environments import (
    ENVIRONMENTS,
    ClusterEnvironment,
    LocalEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
    detect_environment,
    parse_node_list,
)
from notebook_fabric.environments.mpi import DEFAULT_PORT, mpi4py_available
from notebook_fabric.environments.slurm import parse_tasks_per_node

_SCHEDULER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "MPI_LOCAL", "TORCHELASTIC_")
_RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                   "GROUP_RANK", "NODE_RANK")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no scheduler variables, whatever the machine running the tests has."""
    for name in list(os.environ):
        if name.startswith(_SCHEDULER_PREFIXES) or name in _RANK_VARIABLES:
            monkeypatch.delenv(name)


def set_variables(monkeypatch: pytest.MonkeyPatch, **variables: object) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))


TORCHRUN = dict(TORCHELASTIC_RUN_ID="abc", WORLD_SIZE=4, RANK=3, LOCAL_WORLD_SIZE=2, LOCAL_RANK=1,
                GROUP_RANK=1, MASTER_ADDR="10.1.2.3", MASTER_PORT=29511)  # fmt: skip
SLURM = dict(SLURM_NTASKS=8, SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NODEID=1, SLURM_JOB_ID=1234567,
             SLURM_JOB_NODELIST="gpu[007-008]", SLURM_TASKS_PER_NODE="4(x2)", SLURM_JOB_NAME="train")  # fmt: skip
OPENMPI = dict(OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_LOCAL_RANK=1,
               OMPI_COMM_WORLD_LOCAL_SIZE=2)  # fmt: skip
MPICH = dict(PMI_SIZE=6, PMI_RANK=4, MPI_LOCALRANKID=1, MPI_LOCALNRANKS=3)


# ----- TorchElastic -------------------------------------------------------------------------------
def test_torchelastic_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **TORCHRUN)
    assert TorchElasticEnvironment.detect()
    env = TorchElasticEnvironment()
    assert isinstance(env, ClusterEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 3, 1, 1)
    assert (env.main_address, env.main_port, env.local_world_size()) == ("10.1.2.3", 29511, 2)
    assert env.creates_processes_externally is True
    env.set_world_size(99)  # torchrun decides; the strategy's numbers are ignored
    env.set_global_rank(0)
    assert (env.world_size(), env.global_rank()) == (4, 3)
    env.validate_settings(num_devices=2, num_nodes=2)


def test_torchelastic_not_detected_without_torchrun() -> None:
    assert not TorchElasticEnvironment.detect()


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_torchelastic_missing_variable_is_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    set_variables(monkeypatch, **TORCHRUN)
    monkeypatch.delenv(missing)
    with pytest.raises(ValueError, match=f"{missing}, which is not set"):
        TorchElasticEnvironment()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"RANK": 4}, r"RANK=4 is outside the job: WORLD_SIZE=4 allows ranks 0..3"),
        ({"RANK": -1}, r"RANK=-1 must be at least 0"),
        ({"LOCAL_RANK": 2}, r"LOCAL_RANK=2 is outside the job: LOCAL_WORLD_SIZE=2"),
        ({"WORLD_SIZE": "four"}, r"WORLD_SIZE='four' is not an integer"),
        ({"WORLD_SIZE": 0}, r"WORLD_SIZE=0 must be at least 1"),
        ({"MASTER_PORT": 70000}, r"MASTER_PORT=70000 is not a valid TCP port"),
    ],
)
def test_torchelastic_bad_values(monkeypatch: pytest.MonkeyPatch, overrides: dict, message: str) -> None:
    set_variables(monkeypatch, **{**TORCHRUN, **overrides})
    with pytest.raises(ValueError, match=message):
        TorchElasticEnvironment()


def test_torchelastic_rejects_fabric_settings_that_contradict_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **TORCHRUN)
    with pytest.raises(ValueError, match=r"devices=4, num_nodes=2\) asks for 8 ranks.*rank 3 of WORLD_SIZE=4.*--devices 2 --num-nodes 2"):
        TorchElasticEnvironment().validate_settings(num_devices=4, num_nodes=2)


# ----- SLURM node lists ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node001", ["node001"]),
        ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("host-a,host-b", ["host-a", "host-b"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("x[3],y[09-10],z", ["x3", "y09", "y10", "z"]),
        ("node1.cluster.org,node[2-3].cluster.org", ["node1.cluster.org", "node2.cluster.org", "node3.cluster.org"]),
    ],
)
def test_parse_node_list(text: str, hosts: list[str]) -> None:
    assert parse_node_list(text) == hosts


@pytest.mark.parametrize(
    "text, message",
    [
        ("node[1-2", "unclosed"),
        ("node1-2]", "unbalanced"),
        ("node[[1-2]]", "nested"),
        ("node[4-2]", "runs backwards"),
        ("node[a-b]", "not a number or a range"),
        ("", "names no hosts"),
        (" , ", "names no hosts"),
    ],
)
def test_parse_node_list_rejects_malformed_lists(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_node_list(text)


@pytest.mark.parametrize("text, counts", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3])])
def test_parse_tasks_per_node(text: str, counts: list[int]) -> None:
    assert parse_tasks_per_node(text) == counts


# ----- SLURM --------------------------------------------------------------------------------------
def test_slurm_reads_srun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **SLURM)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)
    assert env.main_address == "gpu007"  # the first host of the node list
    assert env.hosts == ["gpu007", "gpu008"]
    assert env.local_world_size() == 4
    assert env.creates_processes_externally is True
    env.validate_settings(num_devices=4, num_nodes=2)


def test_slurm_main_port_derived_from_job_id_alike_on_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **SLURM)
    port = SLURMEnvironment().main_port
    assert 10000 <= port < 30000
    set_variables(monkeypatch, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0)
    assert SLURMEnvironment().main_port == port
    set_variables(monkeypatch, SLURM_JOB_ID=1234568)
    assert SLURMEnvironment().main_port != port


def test_slurm_master_variables_override(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **SLURM, MASTER_ADDR="10.0.0.9", MASTER_PORT=12345)
    env = SLURMEnvironment()
    assert (env.main_address, env.main_port) == ("10.0.0.9", 12345)


def test_slurm_prefers_the_step_node_list(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **SLURM, SLURM_STEP_NODELIST="gpu[012-013]")
    assert SLURMEnvironment().main_address == "gpu012"


@pytest.mark.parametrize("job_name", ["bash", "interactive"])
def test_slurm_interactive_session_is_not_a_multi_rank_job(monkeypatch: pytest.MonkeyPatch, job_name: str) -> None:
    set_variables(monkeypatch, **{**SLURM, "SLURM_JOB_NAME": job_name})
    assert SLURMEnvironment.is_interactive()
    assert not SLURMEnvironment.detect()
    assert isinstance(detect_environment(), LocalEnvironment)
    assert SLURMEnvironment().world_size() == 8  # explicit plugins=[SLURMEnvironment()] still works


def test_slurm_not_detected_without_ntasks(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, SLURM_JOB_ID=1, SLURM_JOB_NODELIST="a1")
    assert not SLURMEnvironment.detect()


@pytest.mark.parametrize("missing", ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"])
def test_slurm_missing_variable_is_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    set_variables(monkeypatch, **SLURM)
    monkeypatch.delenv(missing)
    with pytest.raises(ValueError, match=f"{missing}.*which is not set"):
        SLURMEnvironment()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"SLURM_PROCID": 8}, r"SLURM_PROCID=8 is outside the job: SLURM_NTASKS=8 allows ranks 0..7"),
        ({"SLURM_NODEID": 2}, r"SLURM_NODEID=2 is outside the job: the host count of SLURM_JOB_NODELIST=2"),
        ({"SLURM_LOCALID": 4}, r"SLURM_LOCALID=4 is outside the job"),
        ({"SLURM_NTASKS": "x"}, r"SLURM_NTASKS='x' is not an integer"),
        ({"SLURM_JOB_NODELIST": "gpu[8-7]"}, r"runs backwards"),
        ({"SLURM_TASKS_PER_NODE": "4(y2)"}, r"SLURM_TASKS_PER_NODE='4\(y2\)'"),
    ],
)
def test_slurm_bad_values(monkeypatch: pytest.MonkeyPatch, overrides: dict, message: str) -> None:
    set_variables(monkeypatch, **{**SLURM, **overrides})
    with pytest.raises(ValueError, match=message):
        SLURMEnvironment()


@pytest.mark.parametrize(
    "devices, nodes, message",
    [
        (4, 1, r"num_nodes=1\) but the SLURM job runs on 2 node\(s\).*#SBATCH --nodes=1"),
        (2, 2, r"devices=2\) but SLURM started 4 task\(s\) on this node.*--ntasks-per-node=2"),
    ],
)
def test_slurm_rejects_fabric_settings_that_contradict_the_allocation(
    monkeypatch: pytest.MonkeyPatch, devices: int, nodes: int, message: str
) -> None:
    set_variables(monkeypatch, **SLURM)
    with pytest.raises(ValueError, match=message):
        SLURMEnvironment().validate_settings(num_devices=devices, num_nodes=nodes)


# ----- MPI ----------------------------------------------------------------------------------------
def test_mpi_reads_openmpi_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **OPENMPI, MASTER_ADDR="10.0.0.1", MASTER_PORT=23456)
    assert MPIEnvironment.detect()
    env = MPIEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 3, 1, 1)
    assert (env.main_address, env.main_port) == ("10.0.0.1", 23456)
    assert env.creates_processes_externally is True
    env.validate_settings(num_devices=2, num_nodes=2)
    with pytest.raises(ValueError, match=r"asks for 2 ranks but mpirun started 4"):
        env.validate_settings(num_devices=2, num_nodes=1)


def test_mpi_reads_mpich_and_intel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **MPICH, MASTER_ADDR="n1")
    env = MPIEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (6, 4, 1, 1)
    assert env.main_address == "n1"


@pytest.mark.skipif(mpi4py_available(), reason="with mpi4py the address is broadcast instead")
def test_mpi_single_node_without_mpi4py_uses_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, PMI_SIZE=2, PMI_RANK=1, MPI_LOCALRANKID=1, MPI_LOCALNRANKS=2)
    env = MPIEnvironment()
    assert (env.main_address, env.main_port, env.node_rank()) == ("127.0.0.1", DEFAULT_PORT, 0)


@pytest.mark.skipif(mpi4py_available(), reason="with mpi4py the address is broadcast instead")
def test_mpi_port_derived_from_the_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **OPENMPI, MASTER_ADDR="n1", OMPI_MCA_ess_base_jobid="3735879681")
    first = MPIEnvironment().main_port
    set_variables(monkeypatch, OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_LOCAL_RANK=0)
    assert MPIEnvironment().main_port == first != DEFAULT_PORT


@pytest.mark.skipif(mpi4py_available(), reason="with mpi4py the address is broadcast instead")
def test_mpi_multi_node_without_address_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **OPENMPI)
    with pytest.raises(ValueError, match=r"spans 2 nodes.*MASTER_ADDR.*pip install mpi4py"):
        MPIEnvironment().main_address


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"OMPI_COMM_WORLD_RANK": 4}, r"OMPI_COMM_WORLD_RANK=4 is outside the job: OMPI_COMM_WORLD_SIZE=4"),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": 2}, r"OMPI_COMM_WORLD_LOCAL_RANK=2 is outside the job"),
        ({"OMPI_COMM_WORLD_SIZE": "many"}, r"OMPI_COMM_WORLD_SIZE='many' is not an integer"),
    ],
)
def test_mpi_bad_values(monkeypatch: pytest.MonkeyPatch, overrides: dict, message: str) -> None:
    set_variables(monkeypatch, **{**OPENMPI, **overrides})
    with pytest.raises(ValueError, match=message):
        MPIEnvironment()


def test_mpi_missing_local_rank_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, PMI_SIZE=2, PMI_RANK=0)
    with pytest.raises(ValueError, match=r"OMPI_COMM_WORLD_LOCAL_RANK or MPI_LOCALRANKID or MV2_COMM_WORLD_LOCAL_RANK"):
        MPIEnvironment()


# ----- detection order ----------------------------------------------------------------------------
def test_detection_order_constant() -> None:
    assert ENVIRONMENTS == (TorchElasticEnvironment, SLURMEnvironment, MPIEnvironment, LocalEnvironment)


def test_nothing_set_detects_local() -> None:
    assert type(detect_environment()) is LocalEnvironment


def test_torchrun_inside_slurm_and_mpi_is_torchelastic(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **SLURM, **OPENMPI, **TORCHRUN)
    assert type(detect_environment()) is TorchElasticEnvironment


def test_slurm_before_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **SLURM, **MPICH)  # srun --mpi=pmi2 also sets PMI_*
    assert type(detect_environment()) is SLURMEnvironment


def test_mpi_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **OPENMPI, MASTER_ADDR="n1")
    assert type(detect_environment()) is MPIEnvironment


def test_our_own_launcher_variables_stay_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """notebook-fabric's launchers set the torchrun-style rank variables but no TORCHELASTIC_RUN_ID."""
    set_variables(monkeypatch, RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=1234)
    assert type(detect_environment()) is LocalEnvironment


def test_detection_raises_for_a_broken_scheduler_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    set_variables(monkeypatch, **{**SLURM, "SLURM_PROCID": 99})
    with pytest.raises(ValueError, match="SLURM_PROCID=99"):
        detect_environment()
