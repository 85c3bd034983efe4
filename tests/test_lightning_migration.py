"""Behaviours a loop written for Lightning Fabric 2.6 relies on (found by running Lightning's own
tests against this project: scripts/lightning_suite.py), on one process."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from notebook_fabric import Fabric

pytestmark = pytest.mark.usefixtures("clean_environment")


def test_call_passes_each_hook_only_the_keywords_it_takes() -> None:
    class TakesEpoch:
        def on_train_epoch_end(self, epoch: int) -> None:
            self.got = {"epoch": epoch}

    class TakesAll:
        def on_train_epoch_end(self, epoch: int, **rest: object) -> None:
            self.got = {"epoch": epoch, **rest}

    class TakesNothing:
        def on_train_epoch_end(self) -> None:
            self.got = {}

    class KeywordOnly:
        def on_train_epoch_end(self, *, loss: float) -> None:
            self.got = {"loss": loss}

    callbacks = [TakesEpoch(), TakesAll(), TakesNothing(), KeywordOnly()]
    Fabric(accelerator="cpu", devices=1, callbacks=callbacks).call("on_train_epoch_end", epoch=5, loss=0.1, acc=0.9)
    assert [c.got for c in callbacks] == [{"epoch": 5}, {"epoch": 5, "loss": 0.1, "acc": 0.9}, {}, {"loss": 0.1}]


def test_call_still_raises_for_a_missing_required_argument() -> None:
    class NeedsStep:
        def on_step(self, step: int) -> None:
            pass

    with pytest.raises(TypeError, match="step"):
        Fabric(accelerator="cpu", devices=1, callbacks=[NeedsStep()]).call("on_step", epoch=1)


def test_a_module_with_a_fabric_attribute_gets_the_fabric() -> None:
    """A LightningModule driven by Fabric reaches it through ``self._fabric`` (``self.log``, ``self.logger``)."""

    class LightningLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._fabric = None
            self.layer = nn.Linear(2, 2)

    fabric = Fabric(accelerator="cpu", devices=1)
    first, second = LightningLike(), LightningLike()
    fabric.setup(first)
    fabric.setup_module(second)
    assert first._fabric is fabric and second._fabric is fabric
    plain = nn.Linear(2, 2)
    fabric.setup(plain)
    assert not hasattr(plain, "_fabric")


def test_fabric_does_not_keep_set_up_modules_alive() -> None:
    """Only a count and a weak reference (Lightning keeps a count): a dropped DDP module releases its sockets."""
    import gc
    import weakref

    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped = fabric.setup(nn.Linear(2, 2))
    inner = weakref.ref(wrapped._forward_module)
    loss = wrapped(torch.ones(1, 2)).sum()
    fabric.backward(loss)  # backward(model=None) finds the one set-up module
    del wrapped, loss
    gc.collect()
    assert inner() is None


class _Unsized(torch.utils.data.Sampler):
    def __iter__(self):
        return iter(range(4))


class _Infinite(torch.utils.data.Sampler):
    def __iter__(self):
        return iter(range(4))

    def __len__(self):
        return float("inf")


@pytest.mark.parametrize("sampler, what", [(_Unsized(), "no __len__"), (_Infinite(), "an infinite __len__")])
def test_a_sampler_that_cannot_be_split_is_refused_when_the_loader_is_sharded(sampler: object, what: str) -> None:
    """Lightning refuses it in setup_dataloaders; before, the first batch failed inside the iteration."""
    from torch.utils.data import DataLoader, TensorDataset

    from notebook_fabric.utilities.data import shard_dataloader

    loader = DataLoader(TensorDataset(torch.arange(4.0)), sampler=sampler)
    with pytest.raises(TypeError, match=f"sampler in your DataLoader \\({type(sampler).__name__}\\) with {what}.*"
                                        "use_distributed_sampler=False"):
        shard_dataloader(loader, num_replicas=2, rank=0)


def test_call_skips_an_attribute_that_is_not_callable_with_a_warning() -> None:
    class Flagged:
        on_train_end = True

    with pytest.warns(UserWarning, match="Skipping the callback `Flagged.on_train_end` because it is not callable"):
        Fabric(accelerator="cpu", devices=1, callbacks=[Flagged()]).call("on_train_end")


def test_log_refuses_a_tensor_that_is_not_a_scalar(tmp_path) -> None:
    from notebook_fabric.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    fabric = Fabric(accelerator="cpu", devices=1, loggers=logger)
    fabric.log("one", torch.tensor([2.0]))  # one element: a scalar
    assert logger.metrics[-1]["one"] == 2.0
    with pytest.raises(ValueError, match=r"shape \(2,\): it cannot be converted to a scalar"):
        fabric.log("two", torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="it cannot be converted to a scalar"):
        fabric.log_dict({"nested": {"two": torch.zeros(2, 2)}})


def test_a_plain_backward_is_refused_where_fabric_backward_does_more() -> None:
    """As in Lightning: under 16-mixed (loss scaling) ``loss.backward()`` would give unscaled gradients that the
    scaler's step then divides by the scale; it raises, naming fabric.backward(loss). Full precision allows it."""
    from notebook_fabric.precision import MixedPrecision

    scaled = Fabric(accelerator="cpu", devices=1, plugins=MixedPrecision("16-mixed", device_type="cpu"))
    first, second = scaled.setup(nn.Linear(2, 2)), scaled.setup(nn.Linear(2, 2))
    batch = torch.rand(2, 2)
    with pytest.raises(RuntimeError, match=r"requires you to call `fabric.backward\(loss\)`"):
        second(first(batch)).sum().backward()
    scaled.backward(second(first(batch)).sum(), model=second)  # through Fabric: fine
    assert first.weight.grad is not None  # scaled by 2**16 (float16 may overflow: the scaler skips such steps)
    with torch.no_grad():
        assert second(batch).requires_grad is False  # no hooks where no gradient flows

    plain = Fabric(accelerator="cpu", devices=1).setup(nn.Linear(2, 2))
    plain(batch).sum().backward()
    assert plain.weight.grad is not None


def test_mixed_precision_takes_lightnings_device_keyword() -> None:
    from notebook_fabric.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", device="cpu")
    assert plugin.device_type == "cpu" and plugin.scaler is not None
    assert MixedPrecision(precision="bf16-mixed", device="cpu").scaler is None
    with pytest.raises(ValueError, match="pass one"):
        MixedPrecision("16-mixed", "cpu", device="cuda")
    with pytest.raises(TypeError, match="needs the device type"):
        MixedPrecision("16-mixed")


def test_a_new_attribute_set_on_the_wrapper_lands_on_the_users_module() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) * self.factor

    original = Scaled()
    model = Fabric(accelerator="cpu", devices=1).setup(original)
    model.factor = 3.0  # read by the model's own forward
    assert original.factor == 3.0 and model.factor == 3.0
    assert torch.allclose(model(torch.ones(1, 2)), original.layer(torch.ones(1, 2)) * 3.0)
    model.extra = nn.Linear(1, 1)  # a submodule too: part of the user's module (and its state dict)
    assert "extra.weight" in original.state_dict()


def test_mixed_precision_refuses_a_scaler_for_bf16_and_names_its_device() -> None:
    from notebook_fabric.precision import MixedPrecision

    with pytest.raises(ValueError, match="`precision='bf16-mixed'` does not use a scaler"):
        MixedPrecision("bf16-mixed", "cpu", scaler=torch.amp.GradScaler(device="cpu"))
    assert MixedPrecision("bf16-mixed", device="cpu").device == "cpu"
