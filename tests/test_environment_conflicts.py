"""``Fabric(...)`` arguments against the rank variables a launcher left in the environment.

With torchrun's variables for rank 1 of 2 in the environment, a Fabric is either the job the
environment describes, or the single device the arguments ask for (``devices=1``, as in Lightning,
or ``strategy="single_device"``), or a ``ValueError`` naming both sides of the conflict: never a parallel strategy whose world size
comes from the arguments and whose rank comes from the environment.
"""
from __future__ import annotations

import os

import pytest

from notebook_fabric import Fabric
from notebook_fabric.environments import LocalEnvironment, TorchElasticEnvironment
from notebook_fabric.strategies import ParallelStrategy, SingleDeviceStrategy

_RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                   "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")  # fmt: skip
_TORCHRUN_RANK_1_OF_2 = dict(TORCHELASTIC_RUN_ID="run", WORLD_SIZE=2, RANK=1, LOCAL_WORLD_SIZE=2, LOCAL_RANK=1,
                             GROUP_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29531)  # fmt: skip
_NO_RUN_ID = {name: value for name, value in _TORCHRUN_RANK_1_OF_2.items() if name != "TORCHELASTIC_RUN_ID"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rank or scheduler variables but the ones a test sets."""
    for name in list(os.environ):
        if name in _RANK_VARIABLES or name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "NOTEBOOK_FABRIC_")):
            monkeypatch.delenv(name)


@pytest.fixture(params=["torchrun", "rank variables only"])
def rank_1_of_2(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """torchrun's variables for rank 1 of 2 (with ``TORCHELASTIC_RUN_ID``, then without: LocalEnvironment)."""
    variables = _TORCHRUN_RANK_1_OF_2 if request.param == "torchrun" else _NO_RUN_ID
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))
    return TorchElasticEnvironment if request.param == "torchrun" else LocalEnvironment


def assert_consistent(fabric: Fabric) -> None:
    """What a strategy says about the job agrees with itself and with the environment it uses."""
    strategy = fabric.strategy
    assert 0 <= fabric.global_rank < fabric.world_size
    if isinstance(strategy, ParallelStrategy):
        assert fabric.world_size == strategy.num_nodes * strategy.num_processes
        assert fabric.world_size == strategy.cluster_environment.world_size()


def test_devices_1_in_a_launched_rank_is_one_device_as_in_lightning(rank_1_of_2: type) -> None:
    """A rank may build a Fabric of its own (Lightning's model-parallel full-state-dict tests do):
    ``devices=1`` with the default strategy is a single device, rank 0 of 1, as in Lightning."""
    fabric = Fabric(accelerator="cpu", devices=1)
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert (fabric.global_rank, fabric.world_size) == (0, 1)
    fabric.launch()
    assert fabric.all_reduce(fabric.to_device(__import__("torch").ones(1)), reduce_op="sum").item() == 1.0


def test_devices_1_with_an_explicit_ddp_still_names_the_conflict(rank_1_of_2: type) -> None:
    with pytest.raises(ValueError) as raised:
        Fabric(accelerator="cpu", devices=1, strategy="ddp")
    message = str(raised.value)
    assert "devices=1" in message and "WORLD_SIZE=2" in message and "rank 1" in message
    assert "strategy='single_device'" in message  # the way to honour devices=1 on purpose


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "ddp_spawn"])
def test_an_explicit_parallel_strategy_with_too_few_devices_is_refused(rank_1_of_2: type, strategy: str) -> None:
    with pytest.raises(ValueError, match=r"devices=1.*WORLD_SIZE=2"):
        Fabric(accelerator="cpu", devices=1, strategy=strategy)


def test_single_device_strategy_honours_the_arguments(rank_1_of_2: type) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, strategy="single_device")
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert (fabric.global_rank, fabric.world_size) == (0, 1)
    assert_consistent(fabric)
    fabric.launch()  # nothing to start, no process group to join
    assert fabric.all_reduce(fabric.to_device(__import__("torch").ones(1)), reduce_op="sum").item() == 1.0


@pytest.mark.parametrize("devices", ["auto", 2])
def test_arguments_that_match_the_job_take_it_from_the_environment(rank_1_of_2: type, devices: object) -> None:
    fabric = Fabric(accelerator="cpu", devices=devices)
    assert type(fabric.strategy.cluster_environment) is rank_1_of_2
    assert (fabric.global_rank, fabric.local_rank, fabric.world_size) == (1, 1, 2)
    assert_consistent(fabric)


def test_num_nodes_that_splits_the_world_differently_is_refused(rank_1_of_2: type) -> None:
    """devices=1 x num_nodes=2 makes 2 ranks, as WORLD_SIZE says, but LOCAL_WORLD_SIZE=2 puts both on this node."""
    with pytest.raises(ValueError, match=r"devices=1, num_nodes=2.*(LOCAL_WORLD_SIZE=2|2 per node)"):
        Fabric(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp")


def test_num_nodes_too_many_for_the_world_is_refused(rank_1_of_2: type) -> None:
    with pytest.raises(ValueError, match=r"devices=2, num_nodes=2.*WORLD_SIZE=2"):
        Fabric(accelerator="cpu", devices=2, num_nodes=2)


@pytest.mark.parametrize("with_run_id", [True, False])
def test_two_nodes_of_one_rank_each_match(monkeypatch: pytest.MonkeyPatch, with_run_id: bool) -> None:
    variables = {**_TORCHRUN_RANK_1_OF_2, "LOCAL_WORLD_SIZE": 1, "LOCAL_RANK": 0, "GROUP_RANK": 1, "NODE_RANK": 1}
    if not with_run_id:
        del variables["TORCHELASTIC_RUN_ID"]
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))
    fabric = Fabric(accelerator="cpu", devices=1, num_nodes=2)
    assert (fabric.global_rank, fabric.local_rank, fabric.node_rank, fabric.world_size) == (1, 0, 1, 2)
    assert_consistent(fabric)


def test_without_local_world_size_only_the_total_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher that sets no LOCAL_WORLD_SIZE: 2 nodes x 2 devices is WORLD_SIZE=4, whatever the node split."""
    for name, value in dict(WORLD_SIZE=4, RANK=3, LOCAL_RANK=1, NODE_RANK=1, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=29532).items():  # fmt: skip
        monkeypatch.setenv(name, str(value))
    fabric = Fabric(accelerator="cpu", devices=2, num_nodes=2)
    assert (fabric.global_rank, fabric.world_size) == (3, 4)
    assert_consistent(fabric)
    with pytest.raises(ValueError, match=r"devices=1, num_nodes=2.*WORLD_SIZE=4"):
        Fabric(accelerator="cpu", devices=1, num_nodes=2)
