"""notebook_fabric/wrappers.py: what ``fabric.setup`` and ``setup_dataloaders`` hand back, on one CPU process.

The module wrapper passes attributes, methods and the state dict through to your module; the
optimizer wrapper is an instance of your optimizer's class and reads its state from it; the
dataloader wrapper iterates your DataLoader and passes its attributes through.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from notebook_fabric import Fabric
from support.models import Net

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


def test_setup_returns_wrappers_that_behave_like_the_originals(fabric: Fabric) -> None:
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    model, fabric_optimizer = fabric.setup(net, optimizer)
    assert model.module is net
    assert isinstance(fabric_optimizer, torch.optim.SGD) and fabric_optimizer.optimizer is optimizer
    # attribute and method passthrough, writes reach the original
    assert model.scale == 3 and model.double_scale() == 6 and model.layer is net.layer
    model.scale = 5
    assert net.scale == 5
    # the state dict is the original's (no prefixes)
    assert list(model.state_dict()) == list(net.state_dict()) == ["layer.weight", "layer.bias"]
    x = torch.randn(4, 3)
    assert torch.equal(model(x), net(x))
    # the optimizer: same state dict, steps the parameters, zero_grad
    fabric.backward(model(x).sum())
    before = net.layer.weight.detach().clone()
    fabric_optimizer.step()
    assert not torch.equal(before, net.layer.weight)
    assert fabric_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert len(fabric_optimizer.state_dict()["state"]) == 2
    fabric_optimizer.zero_grad()
    assert net.layer.weight.grad is None


def test_lr_scheduler_drives_the_wrapped_optimizer(fabric: Fabric) -> None:
    net = Net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    fabric.backward(model(torch.randn(2, 3)).sum())
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == optimizer.optimizer.param_groups[0]["lr"] == 0.5


def test_module_wrapper_loads_state_into_the_original_and_names_it(fabric: Fabric) -> None:
    net, other = Net(), Net()
    model = fabric.setup(net)
    assert model.device == torch.device("cpu")
    model.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({})
    assert repr(model).startswith("FabricModule(Net(") and "Linear(in_features=3" in repr(model)


def test_optimizer_wrapper_reads_and_writes_the_originals_groups_state_and_defaults(fabric: Fabric) -> None:
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    _, wrapped = fabric.setup(net, optimizer)
    assert type(wrapped).__name__ == "FabricAdam" and isinstance(wrapped, torch.optim.Adam)
    assert wrapped.param_groups is optimizer.param_groups and wrapped.defaults is optimizer.defaults
    wrapped.param_groups[0]["lr"] = 0.5
    assert optimizer.param_groups[0]["lr"] == 0.5
    fabric.backward(net(torch.randn(2, 3)).sum())
    wrapped.step()
    assert len(optimizer.state) == 2 and wrapped.state is optimizer.state
    saved = wrapped.state_dict()
    fresh = torch.optim.Adam(Net().parameters(), lr=0.01)
    _, restored = fabric.setup(Net(), fresh)
    restored.load_state_dict(saved)  # replaces the original's groups: the wrapper must read them anew
    assert restored.param_groups[0]["lr"] == 0.5 and restored.param_groups is fresh.param_groups
    assert repr(wrapped).startswith("FabricOptimizer(Adam (")


def test_dataloader_wrapper_iterates_the_original_and_passes_attributes_through(fabric: Fabric) -> None:
    dataset = TensorDataset(torch.arange(6.0), torch.arange(6))
    original = DataLoader(dataset, batch_size=4)
    loader = fabric.setup_dataloaders(original)
    assert len(loader) == 2 and loader.batch_size == 4 and loader.dataset is dataset
    assert loader.device is None  # CPU batches are not copied
    batches = [batch for batch in loader]
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert all(b[0].device.type == "cpu" for b in batches)
    assert [b[1].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5]]  # iterates again, like the original
    assert repr(loader).startswith("FabricDataLoader(<torch.utils.data.dataloader.DataLoader")


def test_one_threads_fabric_backward_ending_leaves_a_peers_backward_marked() -> None:
    """XLA:CPU ranks are threads of one process: rank 0's fabric.backward() ending must not make rank
    1's, still running, look like a plain loss.backward()."""
    import threading

    from notebook_fabric import wrappers

    weight = torch.ones(3, requires_grad=True)
    first_inside, first_left = threading.Event(), threading.Event()
    errors: list = []

    def first_rank() -> None:
        with wrappers.in_fabric_backward():
            first_inside.set()
        first_left.set()

    def second_rank() -> None:
        try:
            with wrappers.in_fabric_backward():
                first_inside.wait(5)
                first_left.wait(5)  # the peer's backward has ended while this one runs
                wrappers._refuse_plain_backward((weight * 2).sum()).backward()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=second_rank), threading.Thread(target=first_rank)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert weight.grad is not None and torch.equal(weight.grad, torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match=r"call `fabric.backward\(loss\)` instead of"):
        wrappers._refuse_plain_backward((weight * 2).sum()).backward()
