"""Which precision plugin a strategy ends up with: plugins= > precision= > the strategy's own > 32-true."""
from notebook_fabric import Fabric
from notebook_fabric.precision import MixedPrecision, TruePrecision
from notebook_fabric.strategies import DDPStrategy, SingleDeviceStrategy


def test_a_precision_built_into_the_strategy_is_kept_when_fabric_names_none() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=SingleDeviceStrategy(precision=TruePrecision("bf16-true")))
    assert fabric.strategy.precision.precision == "bf16-true"


def test_precision_argument_wins_over_the_strategy_own() -> None:
    strategy = DDPStrategy(precision=TruePrecision("bf16-true"))
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-mixed")
    assert isinstance(fabric.strategy.precision, MixedPrecision)


def test_a_precision_plugin_wins_over_everything() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed", plugins=[TruePrecision("64-true")])
    assert fabric.strategy.precision.precision == "64-true"


def test_no_precision_anywhere_means_full_precision() -> None:
    assert Fabric(accelerator="cpu", devices=1).strategy.precision.precision == "32-true"
