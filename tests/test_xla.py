"""XLA strategies without an XLA device: the clear error when torch_xla is missing, the registry
names, and the logic that needs no device (reduce-op and precision mapping, argument checks, the
magic's refusal). Nothing of torch_xla is mocked. The tests on real XLA devices are in tests/xla/
(run by scripts/xla_env.sh in an environment of their own; this suite skips them, saying why).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch.distributed as dist
from torch import nn

from notebook_fabric import Fabric
from notebook_fabric.accelerators.xla import xla_available
from notebook_fabric.precision import MixedPrecision, Precision, TruePrecision
from notebook_fabric.strategies import STRATEGY_REGISTRY
from notebook_fabric.strategies.xla import (
    SingleDeviceXLAStrategy, XLAEnvironment, XLAStrategy, check_xla_precision, xla_reduce_type,
)  # fmt: skip
from notebook_fabric.strategies.xla_fsdp import XLAFSDPStrategy, validate_fsdp_arguments

NAMES = {"xla": XLAStrategy, "xla_debug": XLAStrategy, "single_xla": SingleDeviceXLAStrategy, "xla_fsdp": XLAFSDPStrategy}
without_xla = pytest.mark.skipif(xla_available(), reason="torch_xla is installed: the missing-package path cannot run")




def test_registered_names_and_start_methods() -> None:
    for name, cls in NAMES.items():
        assert STRATEGY_REGISTRY.get(name) is cls
    assert STRATEGY_REGISTRY.get_init_params("xla_debug") == {"debug": True}
    # torch_xla's launcher starts the ranks of the multi-device strategies; one device needs none
    assert XLAStrategy.start_method == "xla" and XLAFSDPStrategy.start_method == "xla"
    assert SingleDeviceXLAStrategy.start_method is None
    assert XLAEnvironment.detect() is False  # never picked up for other strategies


@without_xla
@pytest.mark.parametrize("cls", [XLAStrategy, SingleDeviceXLAStrategy, XLAFSDPStrategy])
def test_constructors_say_how_to_install(cls: type) -> None:
    with pytest.raises(ImportError) as error:
        cls()
    message = str(error.value)
    assert f"{cls.__name__} needs torch_xla" in message
    assert "pip install 'notebook-fabric[xla]'" in message and "pins its own torch" in message


@without_xla
@pytest.mark.parametrize("name", sorted(NAMES))
def test_names_say_how_to_install(name: str) -> None:
    with pytest.raises(ImportError, match=r"pip install 'notebook-fabric\[xla\]'"):
        Fabric(accelerator="cpu", devices=1, strategy=name)


def test_import_never_imports_torch_xla() -> None:
    code = textwrap.dedent(
        """
        import sys
        import notebook_fabric
        import notebook_fabric.strategies.xla
        assert "torch_xla" not in sys.modules, "importing the XLA strategies imported torch_xla"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


@pytest.mark.parametrize(
    "reduce_op, expected",
    [("sum", ("sum", False)), ("mean", ("sum", True)), ("avg", ("sum", True)), ("MAX", ("max", False)),
     ("min", ("min", False)), ("product", ("mul", False)), (None, ("sum", True)), (dist.ReduceOp.SUM, ("sum", False)),
     (dist.ReduceOp.AVG, ("sum", True))],
)  # fmt: skip
def test_reduce_ops_map_to_torch_xla(reduce_op: Any, expected: tuple[str, bool]) -> None:
    assert xla_reduce_type(reduce_op) == expected


def test_unknown_reduce_op_is_refused() -> None:
    with pytest.raises(ValueError, match="reduce_op='median' is not supported"):
        xla_reduce_type("median")
    with pytest.raises(ValueError, match="not supported on XLA"):
        xla_reduce_type(dist.ReduceOp.BAND)


def test_precisions_xla_can_run() -> None:
    for precision in (Precision(), MixedPrecision("bf16-mixed", device_type="xla"), TruePrecision("bf16-true"),
                      TruePrecision("16-true")):  # fmt: skip
        assert check_xla_precision(precision) is precision
    with pytest.raises(ValueError, match="use 'bf16-mixed'"):
        check_xla_precision(MixedPrecision("16-mixed", device_type="cpu"))
    with pytest.raises(ValueError, match="not '64-true'"):
        check_xla_precision(TruePrecision("64-true"))


def test_fsdp_argument_checks() -> None:
    validate_fsdp_arguments({nn.TransformerEncoderLayer}, {nn.TransformerEncoderLayer}, "full")
    validate_fsdp_arguments(lambda module, recurse, **kwargs: False, None, "sharded")
    with pytest.raises(ValueError, match="state_dict_type='local'"):
        validate_fsdp_arguments(None, None, "local")
    with pytest.raises(TypeError, match="auto_wrap_policy="):
        validate_fsdp_arguments({"not a class"}, None, "sharded")
    with pytest.raises(TypeError, match="activation_checkpointing_policy="):
        validate_fsdp_arguments(None, [nn.Linear], "sharded")


@pytest.mark.parametrize("name", ["xla", "xla_debug", "xla_fsdp"])
def test_fabric_magic_refuses_xla_strategies_before_any_rank_starts(name: str) -> None:
    """%%fabric keeps a pool of rank processes; XLA's ranks come from torch_xla, one launch at a time."""
    from notebook_fabric.magics.settings import PoolSettings

    with pytest.raises(ValueError, match=rf"--strategy {name}: %%fabric runs cells on a pool .* launch\(train, strategy="):
        PoolSettings().merged({"strategy": name})
    assert PoolSettings().merged({"strategy": "single_xla", "devices": 1}).strategy == "single_xla"
