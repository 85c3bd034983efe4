"""fabric.save / load / load_raw on one process: in-place restore, atomic writes, filters, strictness, weights_only."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from notebook_fabric import Fabric

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def setup_pair(fabric: Fabric, seed: int, lr: float = 0.1):
    torch.manual_seed(seed)
    net = make_model()
    return fabric.setup(net, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9))


def train_step(fabric: Fabric, model, optimizer, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)
    optimizer.zero_grad()
    fabric.backward(nn.functional.mse_loss(model(x), y))
    optimizer.step()


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Unpicklable:
    """Stands in for anything whose serialisation fails half-way through a save."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


class Arbitrary:
    """A class that a weights-only load must refuse to instantiate."""

    def __init__(self) -> None:
        self.value = 1


def test_save_and_load_restore_in_place_and_return_the_rest(fabric: Fabric, tmp_path: Path) -> None:
    model, optimizer = setup_pair(fabric, seed=0)
    for batch in range(2):
        train_step(fabric, model, optimizer, batch)
    path = tmp_path / "nested" / "folder" / "run.ckpt"  # folders are created
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 2, "config": {"lr": 0.1}, "note": "hi"})
    train_step(fabric, model, optimizer, batch=2)  # where the original run goes next

    restored_model, restored_optimizer = setup_pair(fabric, seed=1, lr=0.5)
    assert not same_parameters(model, restored_model)
    state = {"model": restored_model, "optimizer": restored_optimizer, "step": 0}
    remainder = fabric.load(path, state)
    assert remainder == {"config": {"lr": 0.1}, "note": "hi"}
    assert state["step"] == 2 and state["model"] is restored_model and state["optimizer"] is restored_optimizer
    assert restored_optimizer.param_groups[0]["lr"] == 0.1  # the wrapper sees the restored groups
    assert len(restored_optimizer.state) == 4  # momentum buffers restored
    train_step(fabric, restored_model, restored_optimizer, batch=2)
    assert same_parameters(model, restored_model), "resuming must continue exactly where the run was saved"


def test_load_without_state_returns_everything(fabric: Fabric, tmp_path: Path) -> None:
    model, optimizer = setup_pair(fabric, seed=0)
    train_step(fabric, model, optimizer, batch=0)
    fabric.save(tmp_path / "all.ckpt", {"model": model, "optimizer": optimizer, "epoch": 3})
    checkpoint = fabric.load(tmp_path / "all.ckpt")
    assert sorted(checkpoint) == ["epoch", "model", "optimizer"] and checkpoint["epoch"] == 3
    assert list(checkpoint["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in model.state_dict().items())
    assert sorted(checkpoint["optimizer"]) == ["param_groups", "state"]


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(fabric: Fabric, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    model = fabric.setup(make_model())
    fabric.save(path, {"model": model, "step": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        fabric.save(path, {"model": model, "step": 2, "broken": Unpicklable()})
    assert path.read_bytes() == before
    assert fabric.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
    # a first save that fails leaves nothing at all
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        fabric.save(tmp_path / "fresh.ckpt", {"broken": Unpicklable()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_filter_keeps_only_the_selected_entries(fabric: Fabric, tmp_path: Path) -> None:
    model, optimizer = setup_pair(fabric, seed=0)
    fabric.save(tmp_path / "f.ckpt", {"model": model, "optimizer": optimizer, "step": 1},
                filter={"model": lambda name, value: name.endswith("weight")})  # fmt: skip
    checkpoint = fabric.load(tmp_path / "f.ckpt")
    assert list(checkpoint["model"]) == ["0.weight", "2.weight"]
    assert sorted(checkpoint["optimizer"]) == ["param_groups", "state"] and checkpoint["step"] == 1
    with pytest.raises(KeyError, match="missing"):
        fabric.save(tmp_path / "g.ckpt", {"model": model}, filter={"missing": lambda name, value: True})


def test_strict_loading_names_what_is_missing(fabric: Fabric, tmp_path: Path) -> None:
    model, optimizer = setup_pair(fabric, seed=0)
    fabric.save(tmp_path / "s.ckpt", {"model": model, "step": 5})
    with pytest.raises(KeyError, match="optimizer"):
        fabric.load(tmp_path / "s.ckpt", {"model": model, "optimizer": optimizer})
    state = {"model": model, "optimizer": optimizer, "step": 0}
    assert fabric.load(tmp_path / "s.ckpt", state, strict=False) == {}
    assert state["step"] == 5 and state["optimizer"] is optimizer

    bigger = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1))
    wrapped = fabric.setup(bigger)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"3.weight\", \"3.bias\""):
        fabric.load(tmp_path / "s.ckpt", {"model": wrapped})
    fabric.load(tmp_path / "s.ckpt", {"model": wrapped}, strict=False)
    assert torch.equal(bigger[0].weight, model.module[0].weight)


def test_load_of_a_missing_file(fabric: Fabric, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        fabric.load(tmp_path / "nothing.ckpt")


def test_load_raw_reads_plain_state_dicts(fabric: Fabric, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = make_model()
    source_optimizer = torch.optim.Adam(source.parameters(), lr=0.01)
    source(torch.randn(2, 4)).sum().backward()
    source_optimizer.step()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.save(source_optimizer.state_dict(), tmp_path / "optimizer.pt")

    torch.manual_seed(1)
    plain = make_model()
    fabric.load_raw(tmp_path / "model.pt", plain)
    assert same_parameters(plain, source)
    torch.manual_seed(2)
    target = make_model()
    model, optimizer = fabric.setup(target, torch.optim.Adam(target.parameters(), lr=0.5))
    fabric.load_raw(tmp_path / "model.pt", model)
    fabric.load_raw(tmp_path / "optimizer.pt", optimizer)
    assert same_parameters(target, source)
    assert optimizer.param_groups[0]["lr"] == 0.01 and len(optimizer.state) == 4
    with pytest.raises(TypeError, match="module or an optimizer"):
        fabric.load_raw(tmp_path / "model.pt", {"not": "a module"})


def test_load_raw_refuses_arbitrary_pickled_objects(fabric: Fabric, tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1), "payload": Arbitrary()}, tmp_path / "unsafe.pt")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        fabric.load_raw(tmp_path / "unsafe.pt", nn.Linear(1, 1))
