"""ModelParallelStrategy on 2 real CPU ranks over gloo: tensor parallelism on a (1 x 2) mesh,
``fully_shard`` on a (2 x 1) mesh, and checkpoints that move between the two layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import clean_rank_environment
from support.processes import wait_no_children
from notebook_fabric import Fabric, launch
from notebook_fabric.checkpoint import distributed as dist_ckpt
from notebook_fabric.strategies.model_parallel import ModelParallelStrategy

pytestmark = pytest.mark.timeout(240)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.relu(self.up(x)))


def tensor_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(model, mesh["tensor_parallel"], {"up": ColwiseParallel(), "down": RowwiseParallel()})


def data_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if not getattr(model, "forget_to_shard", False):
        fully_shard(model, mesh=mesh["data_parallel"])
    return model


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def full_state(model: nn.Module) -> dict[str, Tensor]:
    return dist_ckpt.model_state(model, full=True, rank0_only=False)


# ----- rank functions ----------------------------------------------------------------------------
def run_tensor_parallel(fabric: Fabric, folder: Path) -> dict[str, Any]:
    strategy = fabric.strategy
    seen: dict[str, Any] = {
        "mesh": (strategy.device_mesh.mesh_dim_names, tuple(strategy.device_mesh.shape)),
        "sampler": strategy.distributed_sampler_kwargs,
    }
    torch.manual_seed(0)
    reference = MLP()
    torch.manual_seed(0)
    with fabric.init_module():
        model = MLP()
    seen["meta_before"] = model.up.weight.is_meta
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    seen["init_equal"] = same(full_state(model), reference.state_dict())
    seen["placements"] = {"up": str(model.up.weight.placements), "down": str(model.down.weight.placements)}
    seen["local_up"] = tuple(model.up.weight.to_local().shape)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))  # the same batch on both TP ranks
    y = x.flip(1)
    seen["forward_equal"] = torch.allclose(model(x), reference(x), atol=1e-6)
    losses = []
    for step in range(10):
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        nn.functional.mse_loss(reference(x), y).backward()
        norm = fabric.clip_gradients(model, optimizer, max_norm=1e6)
        if step == 0:
            seen["norm"] = (norm, torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        losses.append(loss.item())
    seen["losses"] = losses
    seen["trained_like_reference"] = all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(full_state(model).values(), reference.state_dict().values())
    )
    with fabric.no_backward_sync(model):  # nothing to skip over a tensor-parallel-only mesh: a plain context
        pass

    saved = full_state(model)
    fabric.save(folder / "tp", {"model": model, "optimizer": optimizer, "step": 10})
    fabric.backward(nn.functional.mse_loss(model(x), y))
    optimizer.step()
    optimizer.zero_grad()
    seen["moved"] = not same(full_state(model), saved)
    seen["remainder"] = fabric.load(folder / "tp", {"model": model, "optimizer": optimizer})
    seen["restored"] = same(full_state(model), saved)
    strategy.save_distributed_checkpoint = False
    fabric.save(folder / "tp.ckpt", {"model": model})
    seen["saved"] = saved
    return seen


def run_data_parallel(fabric: Fabric, folder: Path) -> dict[str, Any]:
    strategy = fabric.strategy
    seen: dict[str, Any] = {
        "mesh": (strategy.device_mesh.mesh_dim_names, tuple(strategy.device_mesh.shape)),
        "sampler": strategy.distributed_sampler_kwargs,
    }
    torch.manual_seed(0)
    model = MLP()
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.01))
    seen["shards"] = [(p.to_local().numel(), p.numel()) for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, x.flip(1)), batch_size=8))
    seen["batches"] = len(loader)
    losses = []
    for _ in range(10):
        for xb, yb in loader:
            loss = nn.functional.mse_loss(model(xb), yb)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    seen["losses"] = losses
    with fabric.no_backward_sync(model):
        fabric.backward(model(x).sum())
    seen["no_grads_while_skipped"] = all(p.grad is None for p in model.parameters())
    fabric.backward(model(x).sum())
    optimizer.zero_grad()

    unsharded = MLP()
    unsharded.forget_to_shard = True
    try:
        fabric.setup(unsharded)
    except RuntimeError as error:
        seen["unsharded_error"] = str(error)

    fabric.load(folder / "tp", {"model": model})  # saved tensor-parallel, loaded fully sharded
    seen["from_tensor_parallel"] = full_state(model)
    return seen


# ----- the launches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("model_parallel")
    with clean_rank_environment():
        tp = launch(run_tensor_parallel, folder, devices=2, accelerator="cpu",
                    strategy=ModelParallelStrategy(tensor_parallel), return_all=True)  # fmt: skip
        dp = launch(run_data_parallel, folder, devices=2, accelerator="cpu",
                    strategy=ModelParallelStrategy(data_parallel, data_parallel_size=2), return_all=True)  # fmt: skip
    return {"tp": tp, "dp": dp, "folder": folder}


def test_tensor_parallel_mesh_and_samplers(runs):
    for rank, seen in enumerate(runs["tp"]):
        assert seen["mesh"] == (("data_parallel", "tensor_parallel"), (1, 2))
        assert seen["sampler"] == {"num_replicas": 1, "rank": 0}  # both TP ranks read the same batches
    for rank, seen in enumerate(runs["dp"]):
        assert seen["mesh"] == (("data_parallel", "tensor_parallel"), (2, 1))
        assert seen["sampler"] == {"num_replicas": 2, "rank": rank}
        assert seen["batches"] == 4  # 64 samples / 8 per batch / 2 data-parallel ranks


def test_tensor_parallel_forward_equals_the_unsharded_model(runs):
    for seen in runs["tp"]:
        assert seen["meta_before"] and seen["init_equal"]
        assert seen["placements"] == {"up": "(Shard(dim=0),)", "down": "(Shard(dim=1),)"}
        assert seen["local_up"] == (16, 8)
        assert seen["forward_equal"]


def test_tensor_parallel_training_matches_the_unsharded_model(runs):
    for seen in runs["tp"]:
        norm, reference_norm = seen["norm"]
        assert type(norm) is Tensor and torch.allclose(norm, reference_norm, rtol=1e-5)
        assert seen["trained_like_reference"]
        assert seen["losses"][-1] < seen["losses"][0]


def test_tensor_parallel_checkpoints_round_trip_and_consolidate(runs):
    folder = runs["folder"]
    rank0 = runs["tp"][0]
    for seen in runs["tp"]:
        assert seen["moved"] and seen["restored"] and seen["remainder"] == {"step": 10}
    with clean_rank_environment():
        fabric = Fabric(accelerator="cpu", devices=1)
        model = fabric.setup(MLP())
        fabric.load(folder / "tp.ckpt", {"model": model})
    assert same(model.state_dict(), rank0["saved"])


def test_fully_sharded_data_parallel_through_parallelize_fn(runs):
    for seen in runs["dp"]:
        assert all(local * 2 == total for local, total in seen["shards"])
        assert seen["losses"][-1] < 0.5 * seen["losses"][0]
        assert seen["no_grads_while_skipped"]
        assert "fully_shard(model, mesh=device_mesh['data_parallel'])" in seen["unsharded_error"]


def test_a_tensor_parallel_checkpoint_loads_into_the_fully_sharded_layout(runs):
    for seen in runs["dp"]:
        assert same(seen["from_tensor_parallel"], runs["tp"][0]["saved"])


def test_no_rank_survives(runs):
    assert wait_no_children() == []


# ----- arguments, in this process ----------------------------------------------------------------
def test_sizes_default_to_devices_and_nodes_and_must_multiply_to_the_world(clean_environment):
    strategy = Fabric(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(tensor_parallel)).strategy
    assert (strategy.data_parallel_size, strategy.tensor_parallel_size) == (1, 2)
    assert strategy.start_method == "popen" and strategy.shards_parameters
    strategy = ModelParallelStrategy(data_parallel, tensor_parallel_size=1)
    strategy = Fabric(accelerator="cpu", devices=2, strategy=strategy).strategy
    assert (strategy.data_parallel_size, strategy.tensor_parallel_size) == (2, 1)
    with pytest.raises(ValueError, match="must equal the number of ranks \\(2\\)"):
        Fabric(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(tensor_parallel, 2, 2))
    with pytest.raises(RuntimeError, match="fabric.launch"):
        strategy.device_mesh  # noqa: B018


@pytest.mark.parametrize(
    "kwargs, match",
    [({}, "parallelize_fn=fn"), ({"parallelize_fn": tensor_parallel, "tensor_parallel_size": 0}, "positive integer"),
     ({"parallelize_fn": tensor_parallel, "data_parallel_size": "two"}, "'auto' or a positive integer")],
)  # fmt: skip
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelParallelStrategy(**kwargs)


def test_the_registered_name_says_to_pass_the_parallelize_function(clean_environment):
    with pytest.raises(ValueError, match="ModelParallelStrategy\\(parallelize_fn=fn\\)"):
        Fabric(accelerator="cpu", devices=2, strategy="model_parallel")
