"""The launcher seam: the start-method table, the launcher picked for each strategy, and who reads the table."""
from __future__ import annotations

import os

import psutil
import pytest

from notebook_fabric import Fabric, cli, launch
from notebook_fabric.fabric import rank_recipe
from notebook_fabric.launching.launchers import (
    PoolLauncher, ScriptRerunLauncher, ThisProcessLauncher, select_launcher,
)
from notebook_fabric.strategies.start_methods import (
    POOL_START_METHODS, START_METHOD_TABLE, RankSource, start_method_named_by,
)
from notebook_fabric.strategies import STRATEGY_REGISTRY, DDPStrategy


def world_size_plus_rank(fabric: Fabric, offset: int) -> int:
    return fabric.world_size * 10 + fabric.global_rank + offset


@pytest.mark.parametrize(
    "strategy, devices, runs_a_function, expected, start_method",
    [
        ("ddp", 2, False, ScriptRerunLauncher, None),
        ("ddp", 2, True, PoolLauncher, None),  # launch(fn) never re-runs the script on one node
        ("ddp_spawn", 2, True, PoolLauncher, "spawn"),
        ("ddp_notebook", 2, True, PoolLauncher, "fork"),
        ("ddp_forkserver", 2, False, PoolLauncher, "forkserver"),
        ("ddp", 1, False, ThisProcessLauncher, None),
        ("auto", 1, True, ThisProcessLauncher, None),
    ],
)
def test_the_launcher_follows_the_strategy_and_its_start_method(
    strategy: str, devices: int, runs_a_function: bool, expected: type, start_method: str
) -> None:
    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy)
    launcher = select_launcher(fabric.strategy, rank_recipe(fabric), runs_a_function)
    assert type(launcher) is expected
    if expected is PoolLauncher:
        assert launcher._start_method == start_method
    assert launcher.is_interactive_compatible is (expected is not ScriptRerunLauncher)


def test_several_nodes_keep_re_running_the_script() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp")
    assert type(select_launcher(fabric.strategy, rank_recipe(fabric), runs_a_function=True)) is ScriptRerunLauncher


def test_every_registered_start_method_is_in_the_table() -> None:
    for name in STRATEGY_REGISTRY.available_strategies():
        declared = start_method_named_by(name)
        assert declared is None or declared in START_METHOD_TABLE, name
    assert POOL_START_METHODS == ("fork", "spawn", "forkserver")
    assert all(START_METHOD_TABLE[name].source is RankSource.POOL for name in POOL_START_METHODS)


def test_fabric_launch_runs_the_function_on_pool_ranks() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    assert fabric.launch(world_size_plus_rank, 1) == 21  # rank 0's value


def test_a_function_only_strategy_without_a_function_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"start_method='spawn'\) runs a function on each rank"):
        Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch()


def test_an_unknown_start_method_is_refused_before_any_rank_starts() -> None:
    before = {child.pid for child in psutil.Process(os.getpid()).children(recursive=True)}
    with pytest.raises(ValueError, match="start_method='threads' is not one of 'fork', 'spawn', 'forkserver'"):
        launch(world_size_plus_rank, 1, accelerator="cpu", devices=2, start_method="threads")
    with pytest.raises(ValueError, match="start_method='threads' is not one of 'popen', 'fork', 'spawn', 'forkserver'"):
        DDPStrategy(start_method="threads")
    after = {child.pid for child in psutil.Process(os.getpid()).children(recursive=True)}
    assert after <= before


def test_the_cli_refuses_by_the_table_not_by_the_name() -> None:
    """A registered name that spells no start method is refused for what it declares, and one that
    declares a script start method is accepted whatever its name ends with."""
    STRATEGY_REGISTRY.register("pooled_quietly", DDPStrategy, start_method="forkserver")
    STRATEGY_REGISTRY.register("script_named_spawn", DDPStrategy, start_method="popen")
    try:
        assert "--strategy pooled_quietly starts its own processes" in cli.refusal("pooled_quietly")
        assert cli.refusal("script_named_spawn") is None
        assert cli.refusal("ddp") is None and cli.refusal("fsdp") is None
        assert cli.refusal("fsdp_spawn") is not None  # unregistered: the name's last word, read from the table
    finally:
        STRATEGY_REGISTRY.remove("pooled_quietly")
        STRATEGY_REGISTRY.remove("script_named_spawn")


def test_fabric_launch_takes_the_options_of_launch(tmp_path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    values = fabric.launch(world_size_plus_rank, 1, return_all=True, timeout=60, log_dir=tmp_path, dashboard=False,
                           stall=None)
    assert values == [21, 22]
    assert (tmp_path / "rank0" / "stdout.log").exists() and (tmp_path / "rank1" / "stderr.log").exists()


def test_fabric_launch_refuses_a_bad_option_before_any_rank_starts() -> None:
    before = {child.pid for child in psutil.Process(os.getpid()).children(recursive=True)}
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        fabric.launch(world_size_plus_rank, 1, timeout=-1)
    with pytest.raises(TypeError, match="log_dir must be a path"):
        fabric.launch(world_size_plus_rank, 1, log_dir=True)
    with pytest.raises(ValueError, match="start_method='threads' is not one of"):
        fabric.launch(world_size_plus_rank, 1, start_method="threads")
    after = {child.pid for child in psutil.Process(os.getpid()).children(recursive=True)}
    assert after <= before
    assert fabric.launch(world_size_plus_rank, 2) == 22  # nothing was half-started: the same Fabric launches
