"""The strategy registry, the built-in names, and spec/001's custom-strategy example."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from torch import nn

from notebook_fabric import Fabric
from notebook_fabric.strategies import (
    STRATEGY_REGISTRY, DataParallelStrategy, DDPStrategy, ParallelStrategy, SingleDeviceStrategy, Strategy,
    StrategyRegistry,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("clean_environment")


class Quiet(Strategy):
    def __init__(self, volume: int = 1, tag: str = "none", **kwargs) -> None:
        super().__init__(**kwargs)
        self.volume = volume
        self.tag = tag


@pytest.fixture
def global_registry_restored():
    """Tests that register into STRATEGY_REGISTRY leave it as they found it."""

    def entries() -> dict:
        return {name: (STRATEGY_REGISTRY.get(name), STRATEGY_REGISTRY.get_description(name),
                       STRATEGY_REGISTRY.get_init_params(name)) for name in STRATEGY_REGISTRY.available_strategies()}  # fmt: skip

    before = entries()
    yield
    for name, entry in entries().items():
        if name not in before:
            STRATEGY_REGISTRY.remove(name)
        elif entry != before[name]:
            cls, description, params = before[name]
            STRATEGY_REGISTRY.register(name, cls, description, override=True, **params)


def test_register_get_available_create_remove() -> None:
    registry = StrategyRegistry()
    assert registry.available_strategies() == [] and len(registry) == 0
    registry.register("quiet", Quiet, "a quiet one", volume=3)
    registry.register("loud", Quiet, volume=11, tag="loud")
    assert registry.available_strategies() == ["quiet", "loud"] and "quiet" in registry and len(registry) == 2
    assert registry.get("quiet") is Quiet
    assert registry.get_description("quiet") == "a quiet one"
    assert registry.get_init_params("loud") == {"volume": 11, "tag": "loud"}
    quiet = registry.create("quiet")
    assert isinstance(quiet, Quiet) and quiet.volume == 3 and quiet.tag == "none"
    assert registry.create("quiet") is not quiet  # a new instance each time
    assert registry.create("loud", tag="override").tag == "override"
    registry.remove("quiet")
    assert registry.available_strategies() == ["loud"]
    with pytest.raises(KeyError, match="quiet.*Registered: \\['loud'\\]"):
        registry.get("quiet")
    with pytest.raises(KeyError):
        registry.remove("quiet")


def test_duplicates_are_refused_unless_overridden() -> None:
    registry = StrategyRegistry()
    registry.register("quiet", Quiet, volume=1)
    with pytest.raises(ValueError, match="already registered.*override=True"):
        registry.register("quiet", Quiet, volume=2)
    assert registry.create("quiet").volume == 1
    registry.register("quiet", Quiet, override=True, volume=2)
    assert registry.create("quiet").volume == 2


def test_only_strategies_with_names_can_be_registered() -> None:
    registry = StrategyRegistry()
    with pytest.raises(TypeError, match="not a Strategy subclass"):
        registry.register("module", nn.Linear)
    with pytest.raises(TypeError, match="not a Strategy subclass"):
        registry.register("instance", Quiet())
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register("", Quiet)


def test_builtin_names() -> None:
    names = STRATEGY_REGISTRY.available_strategies()
    for name in ("single_device", "dp", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        assert name in names
    assert STRATEGY_REGISTRY.get("single_device") is SingleDeviceStrategy
    assert STRATEGY_REGISTRY.get("dp") is DataParallelStrategy
    assert issubclass(DDPStrategy, ParallelStrategy) and issubclass(ParallelStrategy, Strategy)


@pytest.mark.parametrize(
    "name, start_method",
    [("ddp", "popen"), ("ddp_spawn", "spawn"), ("ddp_fork", "fork"), ("ddp_notebook", "fork"),
     ("ddp_forkserver", "forkserver")],
)  # fmt: skip
def test_ddp_variants_map_to_start_methods(name: str, start_method: str) -> None:
    assert STRATEGY_REGISTRY.create(name).start_method == start_method
    strategy = Fabric(accelerator="cpu", devices=2, strategy=name).strategy
    assert isinstance(strategy, DDPStrategy) and strategy.start_method == start_method
    assert strategy.world_size == 2 and strategy.num_processes == 2 and strategy.process_group_backend == "gloo"


def test_single_device_and_auto() -> None:
    assert Strategy.start_method is None
    assert isinstance(Fabric(accelerator="cpu", devices=1, strategy="auto").strategy, SingleDeviceStrategy)
    assert isinstance(Fabric(accelerator="cpu", devices=2, strategy="auto").strategy, DDPStrategy)
    assert SingleDeviceStrategy(device="cpu").root_device == torch.device("cpu")


def test_ddp_strategy_settings() -> None:
    strategy = DDPStrategy(
        process_group_backend="gloo", timeout=timedelta(minutes=30), find_unused_parameters=False,
        gradient_as_bucket_view=True,
    )  # fmt: skip
    assert strategy.process_group_backend == "gloo" and strategy.timeout == timedelta(minutes=30)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    assert fabric.strategy is strategy and fabric.world_size == 2
    assert DDPStrategy().timeout == timedelta(minutes=30)  # a default that matches torch.distributed's
    with pytest.raises(ValueError, match="start_method='thread'.*popen"):
        DDPStrategy(start_method="thread")
    # the keyword arguments reaching DistributedDataParallel are checked on 2 ranks (test_core_ddp.py)


def test_find_unused_parameters_variant() -> None:
    assert STRATEGY_REGISTRY.get_init_params("ddp_find_unused_parameters_true")["find_unused_parameters"] is True


def test_spec_custom_strategy_example_works_as_written(global_registry_restored) -> None:
    # spec/001, with our import path
    from notebook_fabric.strategies import Strategy, STRATEGY_REGISTRY

    class CustomStrategy(Strategy):
        def setup_module(self, module):
            # Custom module setup
            return module

        def reduce(self, tensor, *args, **kwargs):
            # Custom reduction logic
            return tensor

    # Register custom strategy
    STRATEGY_REGISTRY.register("custom", CustomStrategy)

    # Use custom strategy
    fabric = Fabric(strategy="custom")

    assert type(fabric.strategy) is CustomStrategy and fabric.device == torch.device("cpu")
    assert fabric.world_size == 1 and fabric.is_global_zero
    net = nn.Linear(2, 1)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = net.weight.detach().clone()
    fabric.backward(model(torch.ones(3, 2)).sum())
    optimizer.step()
    assert not torch.equal(before, net.weight)
    tensor = torch.tensor([1.0, 2.0])
    assert fabric.all_reduce(tensor, reduce_op="sum") is tensor  # went through CustomStrategy.reduce
    assert "custom" in STRATEGY_REGISTRY.available_strategies()


def test_custom_strategy_appears_in_the_error_for_unknown_names(global_registry_restored) -> None:
    STRATEGY_REGISTRY.register("quiet_test", Quiet, volume=5)
    assert Fabric(accelerator="cpu", devices=1, strategy="quiet_test").strategy.volume == 5
    with pytest.raises(ValueError, match="quiet_test"):
        Fabric(accelerator="cpu", strategy="no_such_strategy")


def test_every_lightning_name_is_registered() -> None:
    """Lightning 2.6's registry names, its legacy ``single_tpu`` among them, all exist here (this project
    adds a few of its own: docs/lightning-differences.md)."""
    from notebook_fabric.strategies import SingleDeviceXLAStrategy

    lightning_names = {
        "ddp", "ddp_find_unused_parameters_true", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_1_offload",
        "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
        "deepspeed_stage_3_offload_nvme", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_tpu", "single_xla", "xla",
        "xla_fsdp", "dp", "fsdp", "fsdp_cpu_offload",
    }  # fmt: skip
    assert lightning_names <= set(STRATEGY_REGISTRY.available_strategies())
    assert STRATEGY_REGISTRY.get("single_tpu") is STRATEGY_REGISTRY.get("single_xla") is SingleDeviceXLAStrategy
