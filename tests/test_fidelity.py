"""Issue 9: code written for Lightning Fabric trains the same here. Each test names the item it covers.

The rank checks run on 2 real CPU ranks over gloo: one ``launch()`` whose ranks build several
Fabrics in turn (DDP, FSDP, model parallel), each check recorded per rank and compared here.
"""
from __future__ import annotations

import json
import os
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from conftest import SCRIPTS, clean_rank_environment
from support.processes import wait_no_children
from notebook_fabric import Fabric, launch
from notebook_fabric.loggers import CSVLogger, TensorBoardLogger
from notebook_fabric.strategies.deepspeed import DeepSpeedStrategy
from notebook_fabric.strategies.fsdp import FSDPStrategy
from notebook_fabric.strategies.model_parallel import ModelParallelStrategy
from notebook_fabric.utilities.rank_zero import DummyExperiment

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("clean_environment")]


class Stepper(nn.Module):
    """A model written for Lightning: step methods, a helper that runs a layer, one that does not."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1, bias=False)
        nn.init.ones_(self.layer.weight)
        self.seen: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def training_step(self, x: Tensor) -> Tensor:
        self.seen.append(f"training_step:{x.dtype}")
        return self(x).sum()

    def validation_step(self, x: Tensor) -> Tensor:
        return self.layer(x).sum()  # calls a layer, not forward: still inside the wrapper

    def test_step(self, x: Tensor) -> Tensor:
        return self.layer(x).sum()

    def predict_step(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def custom_loss(self, x: Tensor) -> Tensor:
        return self.layer(x).sum()

    def num_weights(self) -> int:
        return sum(p.numel() for p in self.parameters())


def full(tensor: Tensor) -> list:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).tolist()


def attempt(function: Callable[[], Any]) -> Any:
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - recorded and asserted on in the test
        return {"error": type(error).__name__, "message": str(error)}


def routing_checks(fabric: Fabric) -> dict[str, Any]:
    """Item 1 on the current strategy: gradients of model.<step>() equal on every rank."""
    seen: dict[str, Any] = {}
    model = fabric.setup(Stepper())
    x = torch.full((1, 2), float(fabric.global_rank + 1))  # rank r's input: r + 1
    for name in ("training_step", "validation_step", "test_step"):
        fabric.backward(getattr(model, name)(x))
        seen[name] = full(model.layer.weight.grad)
        model.layer.weight.grad = None
    seen["predict_step"] = full(model.predict_step(x).detach())
    seen["bypass"] = attempt(lambda: model.custom_loss(x))
    seen["plain_method"] = model.num_weights()  # a method that runs no layer still works
    model.mark_forward_method("custom_loss")
    fabric.backward(model.custom_loss(x))
    seen["custom_loss"] = full(model.layer.weight.grad)
    seen["forward_restored"] = "forward" not in vars(model.module)
    seen["device"] = str(model.device)
    return seen


def tensor_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    return parallelize_module(model, mesh["tensor_parallel"], {"layer": ColwiseParallel(output_layouts=Replicate())})


def data_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=mesh["data_parallel"])


class Tagged(DataLoader):
    """A DataLoader subclass with its own argument and attribute."""

    def __init__(self, dataset: Any, tag: str, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag

    def describe(self) -> str:
        return f"{self.tag}:{len(self)}"


class Unrebuildable(DataLoader):
    def __init__(self, dataset: Any, secret: int) -> None:
        super().__init__(dataset, batch_size=2)


def indices_of(loader: Any) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def data_checks(fabric: Fabric) -> dict[str, Any]:
    """Items 6 and 7 under DDP."""
    seen: dict[str, Any] = {}
    dataset = TensorDataset(torch.arange(40))
    torch.manual_seed(fabric.global_rank)  # the ranks' own random states differ: the shares must not
    fold = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4, sampler=SubsetRandomSampler(range(0, 40, 2))))
    seen["fold"] = [indices_of(fold), indices_of(fold)]  # two epochs
    tagged = Tagged(dataset, "fold-3", batch_size=5, shuffle=True)
    tagged.note = "set after construction"
    wrapped = fabric.setup_dataloaders(tagged)
    inner = wrapped._dataloader
    seen["subclass"] = {
        "type": type(inner).__name__, "tag": wrapped.tag, "note": wrapped.note, "describe": wrapped.describe(),
        "sampler": type(inner.sampler).__name__, "indices": indices_of(wrapped),
    }  # fmt: skip
    seen["unrebuildable"] = attempt(lambda: fabric.setup_dataloaders(Unrebuildable(dataset, 1)))
    return seen


def collective_checks(fabric: Fabric, folder: Path) -> dict[str, Any]:
    """Items 9, 10, 11 and 12 under DDP."""
    rank = fabric.global_rank
    seen: dict[str, Any] = {}
    flags = fabric.all_gather(rank == 0)
    seen["flags"] = (str(flags.dtype), flags.tolist(), all(flags), all(fabric.all_gather(True)))
    numbers = fabric.all_gather({"int": rank + 5, "float": rank + 0.5, "array": np.array([rank, 10 * rank])})
    seen["numbers"] = {key: (str(value.dtype), value.tolist()) for key, value in numbers.items()}
    seen["reduced"] = {
        "bool": fabric.all_reduce(rank == 1, reduce_op="sum").item(),
        "int": fabric.all_reduce(rank + 1, reduce_op="sum").item(),
        "array": fabric.all_reduce(np.array([1.0, rank]), reduce_op="mean").tolist(),
    }  # fmt: skip
    seen["broadcast"] = (fabric.broadcast(rank == 0), fabric.broadcast(np.array([rank, 7])).tolist())
    seen["shape"] = tuple(fabric.all_gather(torch.zeros(3, 2)).shape)
    tensorboard = TensorBoardLogger(folder / "tb", name="run", version=0)
    csv_logger = CSVLogger(folder / "csv", name="run", version=0)
    tensorboard.experiment.add_text("note", f"from rank {rank}")  # every rank calls it
    tensorboard.log_hyperparams({"rank": rank})
    csv_logger.log_metrics({"rank": rank}, step=0)
    seen["experiment"] = type(tensorboard.experiment).__name__
    seen["csv_experiment"] = type(csv_logger.experiment).__name__
    csv_logger.finalize()
    tensorboard.finalize()
    return seen


def rank_checks(fabric: Fabric, folder: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def record(name: str, function: Callable[[], Any]) -> None:
        try:
            results[name] = function()
        except Exception:  # noqa: BLE001 - the traceback is shown by the test that reads it
            results[name] = {"traceback": traceback.format_exc()}

    record("ddp", lambda: routing_checks(fabric))
    record("data", lambda: data_checks(fabric))
    record("collectives", lambda: collective_checks(fabric, folder))

    def another(strategy: Any, precision: str = "32-true") -> Fabric:
        other = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision=precision)
        other.launch()  # the ranks exist: this only prepares the new Fabric
        return other

    def bf16_step() -> dict[str, Any]:
        bf16 = another("ddp", "bf16-mixed")
        model = bf16.setup(Stepper())
        loss = model.training_step(torch.full((1, 2), float(fabric.global_rank + 1)))
        bf16.backward(loss)
        return {"seen": model.module.seen, "loss": str(loss.dtype), "grad": model.layer.weight.grad.tolist()}

    record("ddp_bf16", bf16_step)
    record("fsdp", lambda: routing_checks(another(FSDPStrategy())))
    def hybrid_mesh() -> dict[str, Any]:
        hybrid = another(FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(1, 2)))
        seen = routing_checks(hybrid)
        mesh = hybrid.strategy.device_mesh
        return {**seen, "mesh": (mesh.mesh_dim_names, tuple(mesh.shape))}

    record("fsdp_hybrid", hybrid_mesh)
    record("model_parallel_dp", lambda: routing_checks(another(ModelParallelStrategy(data_parallel, 2, 1))))

    def tensor_parallel_checks() -> dict[str, Any]:
        tp = another(ModelParallelStrategy(tensor_parallel, data_parallel_size=1, tensor_parallel_size=2))
        dataset = TensorDataset(torch.arange(24))
        torch.manual_seed(fabric.global_rank)  # different random states: the batches must not differ
        loader = tp.setup_dataloaders(DataLoader(dataset, batch_size=4, shuffle=True))
        seen = {"epochs": [indices_of(loader), indices_of(loader)], "sampler": type(loader.sampler).__name__}
        model = tp.setup(Stepper())
        seen["bypass"] = attempt(lambda: model.custom_loss(torch.ones(1, 2)))
        seen["training_step"] = full(model.training_step(torch.ones(1, 2)).detach())
        return seen

    record("tensor_parallel", tensor_parallel_checks)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("fidelity")
    with clean_rank_environment():
        results = launch(rank_checks, folder, devices=2, accelerator="cpu", strategy="ddp", return_all=True)
    assert wait_no_children() == []
    return [dict(r, folder=folder) for r in results]


def both(ranks: list[dict[str, Any]], name: str) -> tuple[dict, dict]:
    for rank in ranks:
        assert "traceback" not in rank[name], rank[name]["traceback"]
    return ranks[0][name], ranks[1][name]


def deepspeed_checks(fabric: Fabric) -> dict[str, Any]:
    """Item 1 under DeepSpeed (ZeRO keeps gradients in its own buffers: read them off one SGD step, lr=1)."""
    ds = Fabric(accelerator="cpu", devices=2, strategy=DeepSpeedStrategy(stage=1, config={"gradient_clipping": 0.0,
                "train_micro_batch_size_per_gpu": 1}))  # fmt: skip
    ds.launch()
    x = torch.full((1, 2), 0.1 * (ds.global_rank + 1))  # small: far from any clipping norm
    seen: dict[str, Any] = {}
    for name in ("training_step", "custom_loss"):
        net = Stepper()
        model, optimizer = ds.setup(net, torch.optim.SGD(net.parameters(), lr=1.0))
        if name == "custom_loss":
            seen["bypass"] = attempt(lambda: model.custom_loss(x))
            model.mark_forward_method(name)
        ds.backward(getattr(model, name)(x), model=model)
        optimizer.step()
        seen[name] = (1.0 - model.module.layer.weight.detach()).tolist()  # = the averaged gradient
    return seen


@pytest.fixture(scope="module")
def deepspeed_ranks() -> list[dict[str, Any]]:
    with clean_rank_environment():
        results = launch(deepspeed_checks, devices=2, accelerator="cpu", strategy="ddp", return_all=True, timeout=400)
    assert wait_no_children() == []
    return results


# ----- item 1 ------------------------------------------------------------------------------------
def test_deepspeed_routes_step_methods_through_its_engine(deepspeed_ranks) -> None:
    for seen in deepspeed_ranks:
        for name in ("training_step", "custom_loss"):
            assert seen[name][0] == pytest.approx([0.15, 0.15], abs=1e-6), (name, seen[name])  # not 0.1 / 0.2
        assert seen["bypass"]["error"] == "RuntimeError" and "DeepSpeedStrategy" in seen["bypass"]["message"]

# ----- item 1 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp_hybrid", "model_parallel_dp"])
def test_step_methods_run_through_the_wrapper_and_sync_gradients(ranks, strategy: str) -> None:
    """Item 1: inputs 1 and 2 on the two ranks give the averaged gradient [[1.5, 1.5]] on both."""
    for seen in both(ranks, strategy):
        for name in ("training_step", "validation_step", "test_step", "custom_loss"):
            assert seen[name] == [[1.5, 1.5]], (strategy, name, seen[name])
        assert seen["plain_method"] == 2
        assert seen["forward_restored"]
        assert seen["bypass"]["error"] == "RuntimeError"
        assert "model.mark_forward_method('custom_loss')" in seen["bypass"]["message"]
    zero, one = both(ranks, strategy)
    assert zero["predict_step"] == [[2.0]] and one["predict_step"] == [[4.0]]


def test_fsdp_takes_lightnings_hybrid_device_mesh(ranks) -> None:
    for seen in both(ranks, "fsdp_hybrid"):
        assert seen["mesh"] == (("replicate", "shard"), (1, 2))
    with pytest.raises(ValueError, match="HYBRID_SHARD"):
        FSDPStrategy(device_mesh=(1, 2))
    with pytest.raises(ValueError, match="replicas, shards_per_replica"):
        FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(0, 2))


def test_tensor_parallel_routes_steps_and_refuses_a_bypass(ranks) -> None:
    for seen in both(ranks, "tensor_parallel"):
        assert seen["bypass"]["error"] == "RuntimeError"
        assert seen["training_step"] == 2.0


def test_mark_forward_method_checks_its_argument() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(Stepper())
    with pytest.raises(ValueError, match="forward"):
        model.mark_forward_method("forward")
    with pytest.raises(AttributeError, match="no method 'nope'"):
        model.mark_forward_method("nope")
    with pytest.raises(TypeError, match="a method or its name"):
        model.mark_forward_method(3)
    model.mark_forward_method(model.module.custom_loss)
    assert model.custom_loss(torch.ones(1, 2)).item() == 2.0  # one device: nothing to bypass


def test_step_methods_get_the_precision_of_the_wrapped_forward(ranks) -> None:
    """Item 1 with item 2: under DDP and bf16-mixed a step method sees bf16 inputs, as forward does."""
    for seen in both(ranks, "ddp_bf16"):
        assert seen == {"seen": ["training_step:torch.bfloat16"], "loss": "torch.float32", "grad": [[1.5, 1.5]]}


# ----- item 3 ------------------------------------------------------------------------------------
def test_ranks_of_a_tensor_parallel_group_read_the_same_batches(ranks) -> None:
    zero, one = both(ranks, "tensor_parallel")
    assert zero["sampler"] == "DistributedSampler"
    assert zero["epochs"] == one["epochs"]
    first, second = zero["epochs"]
    assert sorted(first) == sorted(second) == list(range(24)) and first != second  # still shuffled per epoch


# ----- items 6 and 7 -----------------------------------------------------------------------------
def test_a_custom_sampler_is_split_into_disjoint_shares(ranks) -> None:
    zero, one = both(ranks, "data")
    for epoch in (0, 1):
        mine, theirs = zero["fold"][epoch], one["fold"][epoch]
        assert len(mine) == len(theirs) == 10
        assert set(mine).isdisjoint(theirs) and sorted(mine + theirs) == list(range(0, 40, 2))
    assert zero["fold"][0] != zero["fold"][1]  # a new order each epoch


def test_a_dataloader_subclass_keeps_its_class_and_attributes(ranks) -> None:
    zero, one = both(ranks, "data")
    for seen in (zero, one):
        subclass = seen["subclass"]
        assert subclass["type"] == "Tagged" and subclass["tag"] == "fold-3" and subclass["describe"] == "fold-3:4"
        assert subclass["note"] == "set after construction" and subclass["sampler"] == "DistributedSampler"
        assert seen["unrebuildable"]["error"] == "TypeError" and "['secret']" in seen["unrebuildable"]["message"]
    assert sorted(zero["subclass"]["indices"] + one["subclass"]["indices"]) == list(range(40))


# ----- items 9, 10, 11, 12 -----------------------------------------------------------------------
def test_python_and_numpy_values_are_gathered_and_reduced(ranks) -> None:
    zero, one = both(ranks, "collectives")
    assert zero["flags"] == one["flags"] == ("torch.uint8", [1, 0], False, True)
    assert zero["numbers"] == one["numbers"] == {
        "int": ("torch.int32", [5, 6]), "float": ("torch.float32", [0.5, 1.5]), "array": ("torch.int64", [[0, 0], [1, 10]]),
    }  # fmt: skip
    assert zero["reduced"] == one["reduced"] == {"bool": 1, "int": 3, "array": [1.0, 0.5]}
    assert zero["broadcast"] == one["broadcast"] == (True, [0, 7])


def test_all_gather_stacks_on_two_ranks_and_not_on_one(ranks) -> None:
    for seen in both(ranks, "collectives"):
        assert seen["shape"] == (2, 3, 2)
    fabric = Fabric(accelerator="cpu", devices=1)
    assert fabric.all_gather(torch.zeros(3, 2)).shape == (3, 2)


def test_the_set_up_module_has_a_device(ranks) -> None:
    for name in ("ddp", "fsdp"):
        for seen in both(ranks, name):
            assert seen["device"] == "cpu"
    assert Fabric(accelerator="cpu", devices=1).setup(nn.Linear(1, 1)).device == torch.device("cpu")


def test_logger_experiment_writes_once_from_rank_zero(ranks) -> None:
    zero, one = both(ranks, "collectives")
    assert zero["experiment"] == "SummaryWriter" and one["experiment"] == "DummyExperiment"
    assert zero["csv_experiment"] == "CSVLogger" and one["csv_experiment"] == "DummyExperiment"
    folder = ranks[0]["folder"]
    events = list((folder / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    rows = (folder / "csv" / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    assert rows == ["rank,step", "0,0"]  # columns sorted by name, as in Lightning


def test_logger_root_dir_expands_home_and_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", "runs")
    logger = TensorBoardLogger("~/tb/$RUNS", name="x", version=0)
    assert logger.log_dir == str(tmp_path / "home" / "tb" / "runs" / "x" / "version_0")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.finalize()
    assert list((tmp_path / "home" / "tb" / "runs").rglob("events.out.tfevents.*"))
    assert not Path("~").exists()
    csv_logger = CSVLogger("~/csv", name="x", version=0)
    assert csv_logger.log_dir == str(tmp_path / "home" / "csv" / "x" / "version_0")


def test_dummy_experiment_swallows_every_call() -> None:
    dummy = DummyExperiment()
    assert dummy.add_text("a", "b") is None and dummy[0].add_image("x") is None


# ----- item 8 ------------------------------------------------------------------------------------
def test_a_cli_script_without_launch_is_ready() -> None:
    """Item 8: `notebook-fabric run` created the ranks; the script never calls launch() before setup()."""
    from test_cli import finish, start, survivors

    marker = uuid.uuid4().hex
    code, out, err = finish(start("--accelerator", "cpu", "--devices", "2", str(SCRIPTS / "cli_no_launch.py"),
                                  marker=marker), timeout=180)  # fmt: skip
    assert code == 0, err[-3000:]
    records = {}
    for line in out.splitlines():
        if line.startswith("NFTEST "):
            record = json.loads(line[len("NFTEST "):])
            records[record["rank"]] = record
    assert sorted(records) == [0, 1], out + err[-3000:]
    for record in records.values():
        assert record["world_size"] == 2 and record["initialized"] and record["total"] == 3.0
        assert record["grad"] == [[1.5, 1.5]]
    assert sorted(records[0]["indices"] + records[1]["indices"]) == list(range(8))
    assert survivors(marker) == []


# ----- item 13: Lightning's signatures and defaults ----------------------------------------------
def test_seed_everything_defaults_and_verbose_log(caplog: pytest.LogCaptureFixture) -> None:
    from notebook_fabric import seed_everything
    from notebook_fabric.utilities.seed import WORKERS_ENV

    with caplog.at_level("INFO", logger="notebook_fabric"):
        assert seed_everything(7) == 7
    assert "Seed set to 7" in caplog.text and os.environ[WORKERS_ENV] == "0"  # workers=False by default here
    assert Fabric.seed_everything(8) == 8 and os.environ[WORKERS_ENV] == "1"  # ... and True on Fabric
    caplog.clear()
    with caplog.at_level("INFO", logger="notebook_fabric"):
        seed_everything(9, verbose=False)
    assert caplog.text == ""


def test_setup_returns_the_scheduler_last_and_load_raw_takes_weights_only(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    net = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, fabric_optimizer, returned = fabric.setup(net, optimizer, scheduler=scheduler)
    assert returned is scheduler
    fabric_optimizer.step()
    returned.step()
    assert fabric_optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="needs the optimizer"):
        fabric.setup(nn.Linear(1, 1), scheduler=scheduler)
    torch.save({"state": nn.Linear(2, 1).state_dict(), "note": Path("x")}, tmp_path / "raw.pt")
    torch.save(nn.Linear(2, 1).state_dict(), tmp_path / "plain.pt")
    fabric.load_raw(tmp_path / "plain.pt", model, weights_only=True)
    with pytest.raises(Exception, match="[Ww]eights"):
        fabric.load_raw(tmp_path / "raw.pt", nn.Linear(2, 1))  # weights_only by default
    with pytest.deprecated_call():
        with fabric.sharded_model():
            assert nn.Linear(1, 1).weight.device.type == "cpu"


def test_the_registry_registers_with_a_decorator_and_gets_with_a_default() -> None:
    from notebook_fabric.strategies import STRATEGY_REGISTRY, DDPStrategy

    @STRATEGY_REGISTRY.register("fidelity_test_ddp", description="for this test", find_unused_parameters=True)
    class QuietDDP(DDPStrategy):
        pass

    try:
        assert STRATEGY_REGISTRY.get("fidelity_test_ddp") is QuietDDP
        assert STRATEGY_REGISTRY.get_description("fidelity_test_ddp") == "for this test"
        assert STRATEGY_REGISTRY.create("fidelity_test_ddp")._ddp_kwargs == {"find_unused_parameters": True}
        assert STRATEGY_REGISTRY.get("no_such_strategy", default=DDPStrategy) is DDPStrategy
        assert "deepspeed_stage_1_offload" in STRATEGY_REGISTRY
    finally:
        STRATEGY_REGISTRY.remove("fidelity_test_ddp")


def test_launch_refuses_a_function_that_cannot_take_the_fabric() -> None:
    with pytest.raises(TypeError, match="takes the Fabric as its first argument"):
        Fabric(accelerator="cpu", devices=1).launch(lambda: None)
    assert Fabric(accelerator="cpu", devices=1).launch(lambda fabric, x: x * 2, 21) == 42


def test_load_takes_weights_only(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(nn.Linear(2, 1))
    fabric.save(tmp_path / "ckpt", {"model": model, "where": Path("kept")})
    assert fabric.load(tmp_path / "ckpt", {"model": model}) == {"where": Path("kept")}
    with pytest.raises(Exception, match="[Ww]eights"):
        fabric.load(tmp_path / "ckpt", {"model": model}, weights_only=True)  # a Path is not a plain container
    fabric.save(tmp_path / "plain", {"model": model, "epoch": 3})
    assert fabric.load(tmp_path / "plain", {"model": model}, weights_only=True) == {"epoch": 3}
