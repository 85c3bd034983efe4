"""Every Fabric method and property on one process: ``Fabric(accelerator="cpu", devices=1)``."""
from __future__ import annotations

import csv
import dataclasses
import math
import random
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

import notebook_fabric
from notebook_fabric import Fabric, seed_everything
from notebook_fabric.accelerators import CPUAccelerator
from notebook_fabric.loggers import CSVLogger
from notebook_fabric.strategies import SingleDeviceStrategy
from support.models import Net

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


# ----- properties ------------------------------------------------------------------------------------
def test_properties(fabric: Fabric) -> None:
    assert fabric.global_rank == fabric.local_rank == fabric.node_rank == 0
    assert fabric.world_size == 1
    assert fabric.is_global_zero is True
    assert fabric.device == torch.device("cpu")
    assert isinstance(fabric.strategy, SingleDeviceStrategy)
    assert isinstance(fabric.accelerator, CPUAccelerator)
    assert fabric.loggers == [] and fabric.logger is None


def test_launch_on_one_device_runs_the_function_here(fabric: Fabric) -> None:
    assert fabric.launch(lambda f, a, b=0: (f is fabric, a + b), 2, b=3) == (True, 5)


def test_public_imports() -> None:
    assert notebook_fabric.Fabric is Fabric and notebook_fabric.seed_everything is seed_everything
    from notebook_fabric.strategies import (  # noqa: F401
        STRATEGY_REGISTRY, DataParallelStrategy, DDPStrategy, ParallelStrategy, SingleDeviceStrategy, Strategy,
        StrategyRegistry,
    )  # fmt: skip
    from notebook_fabric.loggers import CSVLogger, TensorBoardLogger  # noqa: F401


# ----- setup ---------------------------------------------------------------------------------------------
def test_setup_variants(fabric: Fabric) -> None:
    only = fabric.setup(Net())
    assert isinstance(only, nn.Module) and not isinstance(only, tuple)
    net = Net()
    model, first, second = fabric.setup(net, torch.optim.SGD(net.layer.parameters(), lr=0.1),
                                        torch.optim.Adam(net.parameters()))  # fmt: skip
    assert isinstance(first, torch.optim.SGD) and isinstance(second, torch.optim.Adam)
    kept = fabric.setup(Net(), move_to_device=False)
    assert kept.layer.weight.device.type == "cpu"


def test_setup_module_and_setup_optimizers(fabric: Fabric) -> None:
    net = Net()
    model = fabric.setup_module(net)
    assert model.module is net and model.scale == 3
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.01))
    assert isinstance(optimizer, torch.optim.AdamW)
    first, second = fabric.setup_optimizers(torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.Adam(net.parameters()))
    assert isinstance(first, torch.optim.SGD) and isinstance(second, torch.optim.Adam)
    fabric.backward(model(torch.randn(2, 3)).sum())
    before = net.layer.bias.detach().clone()
    optimizer.step()
    assert not torch.equal(before, net.layer.bias)


# ----- data ---------------------------------------------------------------------------------------------------
def test_setup_dataloaders_single_and_multiple(fabric: Fabric) -> None:
    dataset = TensorDataset(torch.arange(10.0), torch.arange(10))
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4))
    assert len(loader) == 3 and isinstance(loader.sampler, SequentialSampler)  # not replaced on one device
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(t.device == fabric.device for batch in batches for t in batch)
    train, test = fabric.setup_dataloaders(DataLoader(dataset, batch_size=5, shuffle=True), DataLoader(dataset))
    assert isinstance(train.sampler, RandomSampler) and len(train) == 2 and len(test) == 10
    assert sorted(i for _, idx in train for i in idx.tolist()) == list(range(10))
    unmoved = fabric.setup_dataloaders(DataLoader(dataset), move_to_device=False, use_distributed_sampler=False)
    assert unmoved.device is None and len(list(unmoved)) == 10


class SeedProbe(Dataset):
    """Each item reports which worker produced it and that worker's torch and NumPy random state."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int, int, int]:
        info = torch.utils.data.get_worker_info()
        return info.id, torch.initial_seed(), int(np.random.randint(0, 2**31 - 1)), random.randrange(2**31)


def worker_seeds(fabric: Fabric, seed: int, workers: bool) -> dict[int, tuple[int, int, int]]:
    fabric.seed_everything(seed, workers=workers)
    loader = fabric.setup_dataloaders(DataLoader(SeedProbe(), batch_size=None, num_workers=2))
    return {worker: (torch_seed, numpy_value, python_value) for worker, torch_seed, numpy_value, python_value in loader}


def test_dataloader_workers_are_seeded(fabric: Fabric) -> None:
    seeded = worker_seeds(fabric, 123, workers=True)
    assert sorted(seeded) == [0, 1]
    assert seeded[0][0] != seeded[1][0], "each worker needs its own torch seed"
    assert seeded[0][1] != seeded[1][1], "each worker needs its own NumPy seed"
    assert worker_seeds(fabric, 123, workers=True) == seeded, "worker seeds must be reproducible"
    assert worker_seeds(fabric, 124, workers=True) != seeded
    plain = worker_seeds(fabric, 123, workers=False)
    assert plain[0][0] != plain[1][0]  # torch's own per-worker seeds
    assert plain != seeded, "workers=False must leave worker seeding to torch"
    assert worker_seeds(fabric, 123, workers=False) == plain


# ----- the training step ------------------------------------------------------------------------------------
def test_backward_computes_gradients(fabric: Fabric) -> None:
    linear = nn.Linear(3, 1, bias=False)
    model = fabric.setup(linear)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    fabric.backward(model(x).sum())
    assert torch.equal(linear.weight.grad, torch.tensor([[5.0, 7.0, 9.0]]))
    fabric.backward(model(x).sum(), model=model)  # accumulates like loss.backward()
    assert torch.equal(linear.weight.grad, torch.tensor([[10.0, 14.0, 18.0]]))


def model_with_grads(fabric: Fabric) -> tuple[nn.Module, torch.optim.Optimizer, nn.Linear]:
    linear = nn.Linear(2, 2)
    model, optimizer = fabric.setup(linear, torch.optim.SGD(linear.parameters(), lr=0.1))
    linear.weight.grad = torch.tensor([[3.0, -4.0], [0.5, -0.25]])
    linear.bias.grad = torch.tensor([12.0, 0.0])
    return model, optimizer, linear


def test_clip_gradients_by_value(fabric: Fabric) -> None:
    model, optimizer, linear = model_with_grads(fabric)
    assert fabric.clip_gradients(model, optimizer, clip_val=0.5) is None
    assert torch.equal(linear.weight.grad, torch.tensor([[0.5, -0.5], [0.5, -0.25]]))
    assert torch.equal(linear.bias.grad, torch.tensor([0.5, 0.0]))


def test_clip_gradients_by_2_norm_returns_the_total_norm(fabric: Fabric) -> None:
    model, optimizer, linear = model_with_grads(fabric)
    expected = math.sqrt(3**2 + 4**2 + 0.5**2 + 0.25**2 + 12**2)
    norm = fabric.clip_gradients(model, optimizer, max_norm=1.0)
    assert norm.item() == pytest.approx(expected)
    clipped = torch.cat([linear.weight.grad.flatten(), linear.bias.grad])
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1.0, rel=1e-4)
    assert linear.bias.grad[0].item() == pytest.approx(12.0 / expected, rel=1e-4)
    # a max_norm above the norm leaves the gradients alone (and still reports the norm)
    model, optimizer, linear = model_with_grads(fabric)
    assert fabric.clip_gradients(model, optimizer, max_norm=100, norm_type=2).item() == pytest.approx(expected)
    assert linear.bias.grad[0].item() == pytest.approx(12.0)


@pytest.mark.parametrize("norm_type", ["inf", float("inf")])
def test_clip_gradients_by_inf_norm(fabric: Fabric, norm_type) -> None:
    model, optimizer, linear = model_with_grads(fabric)
    norm = fabric.clip_gradients(model, optimizer, max_norm=6.0, norm_type=norm_type)
    assert norm.item() == pytest.approx(12.0)  # the largest absolute value
    assert linear.bias.grad[0].item() == pytest.approx(6.0, rel=1e-4)
    assert linear.weight.grad[0, 1].item() == pytest.approx(-2.0, rel=1e-4)


def test_clip_gradients_takes_exactly_one_of_clip_val_and_max_norm(fabric: Fabric) -> None:
    model, optimizer, _ = model_with_grads(fabric)
    with pytest.raises(ValueError, match="exactly one of clip_val= or max_norm="):
        fabric.clip_gradients(model, optimizer)
    with pytest.raises(ValueError, match="exactly one of clip_val= or max_norm="):
        fabric.clip_gradients(model, optimizer, clip_val=1.0, max_norm=1.0)
    with pytest.raises(ValueError, match="norm_type"):
        fabric.clip_gradients(model, optimizer, max_norm=1.0, norm_type="manhattan")


# ----- devices and values --------------------------------------------------------------------------------------
Pair = namedtuple("Pair", ["left", "right"])


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    name: str


def test_to_device_moves_nested_collections(fabric: Fabric) -> None:
    data = {
        "input": torch.randn(2, 3),
        "nested": [torch.zeros(1), (torch.ones(2), "label"), Pair(torch.tensor(1), 7)],
        "batch": Batch(torch.arange(3), "b"),
        "count": 3,
    }
    moved = fabric.to_device(data)
    assert moved.keys() == data.keys()
    assert torch.equal(moved["input"], data["input"]) and moved["input"].device == fabric.device
    assert isinstance(moved["nested"][1], tuple) and moved["nested"][1][1] == "label"
    assert isinstance(moved["nested"][2], Pair) and moved["nested"][2].right == 7
    assert isinstance(moved["batch"], Batch) and moved["batch"].name == "b"
    assert torch.equal(moved["batch"].inputs, torch.arange(3))
    assert moved["count"] == 3
    module = nn.Linear(2, 2)
    assert fabric.to_device(module) is module
    tensor = torch.randn(3)
    assert torch.equal(fabric.to_device(tensor), tensor)


def draw() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_is_reproducible(fabric: Fabric) -> None:
    assert seed_everything(42) == 42
    first = draw()
    assert Fabric.seed_everything(42) == 42
    assert draw() == first
    assert fabric.seed_everything(42, workers=False) == 42
    assert draw() == first
    seed_everything(43)
    other = draw()
    assert all(a != b for a, b in zip(other, first))
    with pytest.raises(ValueError, match="is not in bounds"):
        seed_everything(-1)


@pytest.mark.parametrize("seed", [10e9, -10e9, 2**32])
def test_seed_everything_refuses_seeds_numpy_cannot_take(seed: float) -> None:
    with pytest.raises(ValueError, match=r"is not in bounds: numpy accepts an integer from 0 to 4294967295"):
        seed_everything(seed)


def test_seed_everything_again_without_a_seed_keeps_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in Lightning: the first call warns and exports 0; a later call without a seed reads it back silently."""
    import warnings

    from notebook_fabric.utilities.seed import SEED_ENV

    monkeypatch.delenv(SEED_ENV, raising=False)
    with pytest.warns(UserWarning, match="No seed found, seed set to 0"):
        assert seed_everything() == 0
    seed_everything(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seed_everything() == 7
    monkeypatch.setenv(SEED_ENV, "invalid")
    with pytest.raises(ValueError, match="Invalid seed specified via NOTEBOOK_FABRIC_GLOBAL_SEED: 'invalid'"):
        seed_everything()


def test_init_module_and_init_tensor() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    with fabric.init_module():
        assert nn.Linear(2, 2).weight.dtype == torch.float32
    bf16 = Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    with bf16.init_module():
        module = nn.Linear(2, 2)
    assert module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
    assert torch.get_default_dtype() == torch.float32  # restored
    with bf16.init_tensor():
        assert torch.zeros(2).dtype == torch.bfloat16
    assert torch.zeros(2).dtype == torch.float32
    with Fabric(accelerator="cpu", devices=1, precision="64-true").init_module():
        assert nn.Linear(2, 2).weight.dtype == torch.float64



def test_empty_init_without_sharding_allocates_and_skips_initialisation() -> None:
    """Item 5 of issue 9: memory on the device (not meta), no random draws, and setup() works."""
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    expected_next_draw = torch.rand(1)
    torch.manual_seed(0)
    with fabric.init_module(empty_init=True):
        model = nn.Sequential(nn.Linear(4, 3), nn.TransformerEncoderLayer(3, 1, dim_feedforward=4), nn.LayerNorm(3))
    assert torch.equal(torch.rand(1), expected_next_draw), "no initialiser should have drawn random numbers"
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    source = nn.Sequential(nn.Linear(4, 3), nn.TransformerEncoderLayer(3, 1, dim_feedforward=4), nn.LayerNorm(3))
    model.load_state_dict(source.state_dict())
    wrapped = fabric.setup(model)
    x = torch.randn(2, 1, 4)
    source.eval(), wrapped.eval()
    assert torch.equal(wrapped(x), source(x))
    torch.manual_seed(1)
    reference = nn.Linear(2, 2)
    torch.manual_seed(1)
    with fabric.init_module(empty_init=False):  # initialised as usual
        assert torch.equal(nn.Linear(2, 2).weight, reference.weight)


def test_autocast() -> None:
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    mixed = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    with mixed.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with Fabric(accelerator="cpu", devices=1).autocast():
        assert (a @ b).dtype == torch.float32


def test_print_on_rank_zero(fabric: Fabric, capsys: pytest.CaptureFixture) -> None:
    fabric.print("epoch", 1, "loss", 0.5, sep="|")
    fabric.print("to stderr", file=sys.stderr)
    captured = capsys.readouterr()
    assert captured.out == "epoch|1|loss|0.5\n" and captured.err == "to stderr\n"


def test_no_backward_sync_is_a_silent_no_op_on_one_device(fabric: Fabric) -> None:
    linear = nn.Linear(2, 1, bias=False)
    model = fabric.setup(linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fabric.no_backward_sync(model, enabled=True):
            fabric.backward(model(torch.ones(1, 2)).sum())
        with fabric.no_backward_sync(model, enabled=False):
            fabric.backward(model(torch.ones(1, 2)).sum())
    assert torch.equal(linear.weight.grad, torch.tensor([[2.0, 2.0]]))
    with pytest.raises(TypeError, match="fabric.setup"):
        fabric.no_backward_sync(linear)


class CannotSkipSync(SingleDeviceStrategy):
    """A strategy with no gradient synchronisation to skip (like dp, deepspeed, xla)."""

    def backward_sync(self, module, enabled):
        return None


def test_no_backward_sync_warns_where_the_strategy_cannot_skip_the_sync() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=CannotSkipSync())
    model = fabric.setup(nn.Linear(2, 1))
    with pytest.warns(UserWarning, match="CannotSkipSync cannot skip gradient synchronisation"):
        context = fabric.no_backward_sync(model)
    with context:
        fabric.backward(model(torch.ones(1, 2)).sum())
    assert model.weight.grad is not None


def test_rank_zero_first_runs_the_block(fabric: Fabric) -> None:
    ran = []
    for local in (False, True):
        with fabric.rank_zero_first(local=local):
            ran.append(local)
    assert ran == [False, True]


def test_call_runs_only_the_callbacks_that_define_the_hook() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls = []

        def on_train_start(self) -> None:
            self.calls.append("start")

        def on_train_epoch_end(self, model, results) -> None:
            self.calls.append(("epoch_end", model, results))

    class Other:
        on_train_start = "not callable"

    first, second, other = Recorder(), Recorder(), Other()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[first, other, second])
    fabric.call("on_train_start")
    fabric.call("on_train_epoch_end", model="m", results={"acc": 1.0})
    fabric.call("on_unknown_hook", 1, 2)
    assert first.calls == second.calls == ["start", ("epoch_end", "m", {"acc": 1.0})]
    single = Recorder()
    Fabric(accelerator="cpu", devices=1, callbacks=single).call("on_train_start")
    assert single.calls == ["start"]


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    logger.save()
    with open(logger.metrics_file_path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_log_and_log_dict_reach_every_logger(tmp_path: Path) -> None:
    first, second = CSVLogger(tmp_path, name="a"), CSVLogger(tmp_path, name="b")
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[first, second])
    assert fabric.loggers == [first, second] and fabric.logger is first
    fabric.log("loss", torch.tensor(0.25), step=0)
    fabric.log_dict({"acc": 0.75, "count": torch.tensor(3), "lr": 1e-3}, step=1)
    for logger in (first, second):
        assert read_metrics(logger) == [
            {"step": "0", "loss": "0.25", "acc": "", "count": "", "lr": ""},
            {"step": "1", "loss": "", "acc": "0.75", "count": "3", "lr": "0.001"},
        ]
    single = CSVLogger(tmp_path, name="c")
    fabric = Fabric(accelerator="cpu", devices=1, loggers=single)
    assert fabric.loggers == [single] and fabric.logger is single
    Fabric(accelerator="cpu", devices=1).log("ignored", 1.0)  # no loggers: nothing happens


# ----- collectives on one process --------------------------------------------------------------------------
def test_collectives_on_one_process(fabric: Fabric) -> None:
    tensor = torch.tensor([1.0, -2.0])
    for op in ("sum", "mean", "max", "min"):
        assert torch.equal(fabric.all_reduce(tensor, reduce_op=op), tensor)
    reduced = fabric.all_reduce({"a": torch.tensor(2.0), "b": [torch.tensor([1, 2]), 0.5]}, reduce_op="sum")
    assert reduced["a"].item() == 2.0 and reduced["b"][0].tolist() == [1, 2] and reduced["b"][1].item() == 0.5
    assert torch.equal(tensor, torch.tensor([1.0, -2.0]))

    gathered = fabric.all_gather(tensor)  # one process: no dimension added (Lightning's contract)
    assert gathered.shape == (2,) and torch.equal(gathered, tensor)
    nested = fabric.all_gather({"x": torch.ones(2, 2), "y": [torch.tensor(3.0), 0.5]})
    assert nested["x"].shape == (2, 2) and nested["y"][0].item() == 3.0 and nested["y"][1].item() == 0.5
    flags = fabric.all_gather({"ok": True, "n": 3, "array": np.arange(3)})
    assert flags["ok"].dtype == torch.uint8 and flags["ok"].item() == 1 and bool(fabric.all_gather(True))
    assert flags["n"].dtype == torch.int32 and flags["array"].tolist() == [0, 1, 2]
    assert fabric.all_reduce(False, reduce_op="max").dtype == torch.uint8
    leaf = torch.tensor([2.0], requires_grad=True)
    (fabric.all_gather(leaf, sync_grads=True) * 3).sum().backward()
    assert leaf.grad.tolist() == [3.0]

    assert torch.equal(fabric.broadcast(tensor), tensor)
    config = {"lr": 0.001, "batch_size": 32}
    assert fabric.broadcast(config, src=0) == config
    fabric.barrier()
    fabric.barrier("named")
