"""Bad inputs fail early and clearly: constructor arguments (ValueError naming the valid choices), strategies
that need hardware this machine lacks, and misuse of launch / setup / clip_gradients."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from notebook_fabric import Fabric
from support.processes import rank_like_children

pytestmark = pytest.mark.usefixtures("clean_environment")


def no_children() -> bool:
    """No living child process, multiprocessing's long-lived helpers (a fork server an earlier test
    started, its resource tracker) left out: a leaked rank still counts."""
    return rank_like_children() == []


@pytest.mark.parametrize("strategy", ["ddpp", "fsdp_typo", "", 7])
def test_bad_strategy(strategy) -> None:
    with pytest.raises(ValueError, match="strategy=") as error:
        Fabric(accelerator="cpu", strategy=strategy)
    for choice in ("auto", "single_device", "ddp", "ddp_spawn", "ddp_notebook", "dp"):
        assert repr(choice) in str(error.value)
    assert no_children()


@pytest.mark.parametrize(
    "devices, message",
    [
        (0, "devices=0 must be at least 1"),
        (-2, "devices=-2 must be at least 1"),
        (1000, "asks for more CPU devices than this machine has"),
        ([0, 0], r"devices=\[0, 0\] names a device twice"),
        ([], "empty"),
        ("two", "devices='two' is not understood: use an int, 'auto', -1, or a list of indices"),
        (True, "is not understood"),
        (1.5, "is not understood"),
    ],
)
def test_bad_devices(devices, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fabric(accelerator="cpu", devices=devices)


@pytest.mark.parametrize("devices, processes", [(1, 1), (2, 2), ("2", 2), ("auto", 1), ([0, 1], 2), ("0,1", 2)])
def test_good_devices(devices, processes: int) -> None:
    fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices not in (1, "auto") else "auto")
    assert fabric.strategy.num_processes == processes  # every spelling of the count is understood alike
    assert type(fabric.strategy).__name__ == ("DDPStrategy" if processes > 1 else "SingleDeviceStrategy")
    assert fabric.device.type == "cpu"
    assert no_children()  # building a Fabric starts no process


@pytest.mark.parametrize("num_nodes", [0, -1, "2", 1.5, True, None])
def test_bad_num_nodes(num_nodes) -> None:
    with pytest.raises(ValueError, match=f"num_nodes={num_nodes!r} must be a positive integer"):
        Fabric(accelerator="cpu", num_nodes=num_nodes)


@pytest.mark.parametrize("precision", ["fp8", "8-mixed", 8, "bf32", "half"])
def test_bad_precision(precision) -> None:
    with pytest.raises(ValueError, match="precision=") as error:
        Fabric(accelerator="cpu", precision=precision)
    for choice in ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"):
        assert repr(choice) in str(error.value)


@pytest.mark.parametrize("plugins", [object(), "gloo", [1]])
def test_bad_plugins(plugins) -> None:
    with pytest.raises(ValueError, match="not a Precision, a ClusterEnvironment or a checkpoint IO"):
        Fabric(accelerator="cpu", plugins=plugins)


def test_single_device_strategy_on_two_devices() -> None:
    with pytest.raises(ValueError, match="runs on one device.*strategy='ddp'"):
        Fabric(accelerator="cpu", devices=2, strategy="single_device")


def test_dp_on_cpu_falls_back_to_ddp_with_a_warning() -> None:
    """As in Lightning: DataParallel is for GPUs; on CPUs strategy='dp' becomes DDP, and says so."""
    from notebook_fabric.strategies import DDPStrategy

    with pytest.warns(UserWarning, match="strategy='dp' is not supported on CPUAccelerator, hence setting strategy='ddp'"):
        fabric = Fabric(accelerator="cpu", strategy="dp", devices=2)
    assert isinstance(fabric.strategy, DDPStrategy) and fabric.world_size == 2
    assert fabric.strategy.start_method == "popen"  # what strategy="ddp" would start


def test_a_dp_instance_still_needs_cuda() -> None:
    from notebook_fabric.strategies import DataParallelStrategy

    with pytest.raises(ValueError, match="strategy='dp' needs CUDA GPUs.*on CPU use strategy='ddp'"):
        Fabric(accelerator="cpu", strategy=DataParallelStrategy())


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_launching_a_function_strategy_without_a_function(strategy: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    with pytest.raises(RuntimeError, match=r"call fabric.launch\(train_fn\)"):
        fabric.launch()
    assert no_children()


def test_launch_takes_a_callable_and_runs_once() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    with pytest.raises(TypeError, match="takes a function"):
        fabric.launch("train.py")
    fabric.launch()
    with pytest.raises(RuntimeError, match="already called"):
        fabric.launch()


def test_setup_before_launch_on_two_devices() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    for call in (lambda: fabric.setup(nn.Linear(1, 1)), lambda: fabric.setup_module(nn.Linear(1, 1)),
                 lambda: fabric.init_module()):  # fmt: skip
        with pytest.raises(RuntimeError, match=r"call fabric.launch\(\) first"):
            call()


def test_setup_of_wrapped_objects() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    net = nn.Linear(2, 1)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="model was already set up"):
        fabric.setup(model)
    with pytest.raises(ValueError, match="model was already set up"):
        fabric.setup_module(model)
    with pytest.raises(ValueError, match="optimizer was already set up"):
        fabric.setup(nn.Linear(2, 1), optimizer)
    with pytest.raises(ValueError, match="optimizer was already set up"):
        fabric.setup_optimizers(optimizer)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(4))))
    with pytest.raises(ValueError, match="already set up"):
        fabric.setup_dataloaders(loader)
    with pytest.raises(ValueError, match="at least one DataLoader"):
        fabric.setup_dataloaders()
    with pytest.raises(TypeError, match="DataLoader"):
        fabric.setup_dataloaders([1, 2, 3])


def test_clip_gradients_with_both_or_neither() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    net = nn.Linear(2, 1)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    fabric.backward(model(torch.ones(1, 2)).sum())
    for kwargs in ({}, {"clip_val": 1.0, "max_norm": 1.0}):
        with pytest.raises(ValueError, match="exactly one of clip_val= or max_norm="):
            fabric.clip_gradients(model, optimizer, **kwargs)
