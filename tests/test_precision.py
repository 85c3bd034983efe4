"""Precision settings on CPU: names and aliases, module dtypes, autocast in forward, loss scaling."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from notebook_fabric import Fabric
from notebook_fabric.precision import MixedPrecision, Precision, TruePrecision

pytestmark = pytest.mark.usefixtures("clean_environment")

ALIASES = [
    (32, "32-true", Precision), ("32", "32-true", Precision), ("32-true", "32-true", Precision),
    (64, "64-true", TruePrecision), ("64", "64-true", TruePrecision), ("64-true", "64-true", TruePrecision),
    (16, "bf16-mixed", MixedPrecision), ("16", "bf16-mixed", MixedPrecision), ("16-mixed", "bf16-mixed", MixedPrecision),
    ("bf16", "bf16-mixed", MixedPrecision), ("bf16-mixed", "bf16-mixed", MixedPrecision),
    ("16-true", "16-true", TruePrecision), ("bf16-true", "bf16-true", TruePrecision), (None, "32-true", Precision),
]  # fmt: skip
TRUE_DTYPES = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def cpu_fabric(precision) -> Fabric:
    if precision == "16-mixed":  # float16 autocast and loss scaling on the CPU need the plugin itself
        return Fabric(accelerator="cpu", devices=1, plugins=MixedPrecision("16-mixed", device_type="cpu"))
    return Fabric(accelerator="cpu", devices=1, precision=precision)


@pytest.mark.parametrize("given, name, plugin", ALIASES)
def test_every_precision_name_and_alias_resolves(given, name: str, plugin: type) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on the CPU warns; tested below
        precision = Fabric(accelerator="cpu", devices=1, precision=given).strategy.precision
    assert type(precision) is plugin and precision.precision == name


@pytest.mark.parametrize("given", [16, "16", "16-mixed"])
def test_16_mixed_on_the_cpu_becomes_bf16_mixed_with_a_warning(given) -> None:
    with pytest.warns(UserWarning, match="'bf16-mixed' is used instead"):
        fabric = Fabric(accelerator="cpu", devices=1, precision=given)
    precision = fabric.strategy.precision
    assert precision.precision == "bf16-mixed" and precision.dtype is torch.bfloat16 and precision.scaler is None
    probe = AutocastProbe()
    fabric.setup(probe)(torch.randn(2, 4))
    assert probe.seen == (True, torch.bfloat16)


@pytest.mark.parametrize("name, dtype", TRUE_DTYPES.items())
def test_true_precisions_convert_the_module_and_its_inputs(name: str, dtype: torch.dtype) -> None:
    fabric = cpu_fabric(name)
    linear = nn.Linear(3, 2)
    model = fabric.setup(linear)
    assert linear.weight.dtype == dtype and linear.bias.dtype == dtype
    output = model(torch.randn(4, 3))  # float32 input is cast to the module's dtype
    assert output.dtype == torch.float32  # and the output back to the default dtype
    assert torch.get_default_dtype() == torch.float32
    embedding = fabric.setup(nn.Embedding(5, 2))
    assert embedding(torch.tensor([1, 4])).shape == (2, 2)  # integer inputs are not cast


class AutocastProbe(nn.Module):
    """Records whether its forward runs under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen = None
        self.inputs: list = []

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        self.seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        self.inputs = [x.dtype, *(t.dtype for t in extra)]
        return self.linear(x)


@pytest.mark.parametrize("name, dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_mixed_precision_autocasts_the_wrapped_forward(name: str, dtype: torch.dtype) -> None:
    probe = AutocastProbe()
    model = cpu_fabric(name).setup(probe)
    output = model(torch.randn(3, 4), torch.arange(3), torch.randn(2, dtype=torch.complex64))
    assert probe.seen == (True, dtype)
    assert probe.inputs == [dtype, torch.int64, torch.complex64]  # floating inputs in the half dtype, others kept
    assert output.dtype == torch.float32  # the output comes back in float32
    assert probe.linear(torch.randn(3, 4)).dtype == torch.float32  # no autocast left behind
    assert probe.linear.weight.dtype == torch.float32  # weights stay in float32
    assert not torch.is_autocast_enabled("cpu")
    assert probe(torch.randn(3, 4)).dtype == torch.float32  # the unwrapped module is untouched


def test_full_precision_does_not_autocast() -> None:
    probe = AutocastProbe()
    output = cpu_fabric("32-true").setup(probe)(torch.randn(3, 4))
    assert probe.seen[0] is False and output.dtype == torch.float32


def regression_losses(fabric: Fabric, steps: int = 40) -> list[float]:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(64, 1)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model, optimizer = fabric.setup(net, torch.optim.Adam(net.parameters(), lr=0.02))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true"])
def test_bf16_trains_on_cpu(name: str) -> None:
    losses = regression_losses(cpu_fabric(name))
    assert losses[-1] < 0.3 * losses[0], losses


def test_16_mixed_scales_the_loss_and_clipping_sees_unscaled_gradients() -> None:
    fabric = cpu_fabric("16-mixed")
    scaler = fabric.strategy.precision.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    scale = scaler.get_scale()
    assert scale == 2.0**16
    linear = nn.Linear(3, 1, bias=False)
    model, optimizer = fabric.setup(linear, torch.optim.SGD(linear.parameters(), lr=0.1))
    x = torch.full((4, 3), 0.5)
    true_grad = torch.full((1, 3), 0.5)  # d mean(x @ w.T) / dw
    for _ in range(2):  # the second step checks the scaler's bookkeeping was reset by the first
        weight = linear.weight.detach().clone()
        optimizer.zero_grad()
        fabric.backward(model(x).float().mean())
        assert torch.allclose(linear.weight.grad, true_grad * scale)  # the scale applies
        norm = fabric.clip_gradients(model, optimizer, max_norm=10.0)
        assert norm.item() == pytest.approx(torch.linalg.vector_norm(true_grad).item(), rel=1e-3)
        assert torch.allclose(linear.weight.grad, true_grad)  # unscaled in place, once
        optimizer.step()
        assert torch.allclose(linear.weight.detach(), weight - 0.1 * true_grad)  # not unscaled a second time
        assert scaler.get_scale() == scale


def test_16_mixed_clip_by_value_unscales_first() -> None:
    fabric = cpu_fabric("16-mixed")
    linear = nn.Linear(3, 1, bias=False)
    model, optimizer = fabric.setup(linear, torch.optim.SGD(linear.parameters(), lr=1.0))
    fabric.backward(model(torch.full((4, 3), 0.5)).float().mean())
    fabric.clip_gradients(model, optimizer, clip_val=0.25)
    assert torch.allclose(linear.weight.grad, torch.full((1, 3), 0.25))
    weight = linear.weight.detach().clone()
    optimizer.step()
    assert torch.allclose(linear.weight.detach(), weight - 0.25)


def test_16_mixed_skips_a_step_whose_gradients_overflowed() -> None:
    fabric = cpu_fabric("16-mixed")
    scaler = fabric.strategy.precision.scaler
    linear = nn.Linear(3, 1, bias=False)
    model, optimizer = fabric.setup(linear, torch.optim.SGD(linear.parameters(), lr=0.1))
    weight = linear.weight.detach().clone()
    fabric.backward(model(torch.full((4, 3), 1e4)).float().sum())  # overflows float16 once scaled
    optimizer.step()
    assert torch.equal(linear.weight.detach(), weight)
    assert scaler.get_scale() < 2.0**16


def test_16_mixed_trains_on_cpu() -> None:
    losses = regression_losses(cpu_fabric("16-mixed"))
    assert losses[-1] < 0.3 * losses[0], losses


class WithComplex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("phase", torch.tensor([1 + 2j, -3j], dtype=torch.complex64))
        self.register_buffer("steps", torch.tensor([1, 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.phase.abs().to(x.dtype)


@pytest.mark.parametrize("name", ["64-true", "bf16-true"])
def test_true_precision_converts_like_module_double_and_keeps_complex_tensors(name: str) -> None:
    """Item 4 of issue 9: the imaginary part survives and torch does not warn about discarding it."""
    module = WithComplex()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = cpu_fabric(name).setup(module)
    assert module.linear.weight.dtype == TRUE_DTYPES[name]
    assert module.phase.dtype == torch.complex64 and module.phase.tolist() == [1 + 2j, -3j]
    assert module.steps.dtype == torch.int64
    reference = WithComplex().double()
    assert {k: v.dtype for k, v in reference.state_dict().items()}["phase"] == module.phase.dtype
    assert model(torch.ones(1, 2)).dtype == torch.float32
