"""DeepSpeedStrategy: ZeRO 1-3 on 2 real CPU ranks over gloo (DeepSpeed's CPU accelerator).

Starting ranks and importing deepspeed cost seconds, so two launches run every multi-rank check:
``rank_checks`` (stages 1-3, arguments -> config, bf16, checkpoints, the clear errors), each check
caught on its own so one failure does not hide the others, and ``spec_example`` (spec/001's
``DeepSpeedStrategy(config=...)`` with CPU offload, passed as an instance through ``launch``).
DeepSpeed's C++ op is built (or found built) once, before either launch.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import notebook_fabric
from conftest import clean_rank_environment
from support.processes import wait_no_children
from notebook_fabric import Fabric
from notebook_fabric.precision import MixedPrecision, Precision, TruePrecision
from notebook_fabric.precision.deepspeed import DeepSpeedPrecision, to_deepspeed_precision
from notebook_fabric.strategies import STRATEGY_REGISTRY
from notebook_fabric.strategies.deepspeed import (
    CLIENT_STATE_KEY, DeepSpeedStrategy, build_zero_config, consolidate_checkpoint, deepspeed_available,
)  # fmt: skip

REPO = Path(__file__).resolve().parents[1]
NAMES = ("deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
         "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme")  # fmt: skip
needs_deepspeed = pytest.mark.skipif(
    not deepspeed_available(), reason="deepspeed is not installed (pip install 'notebook-fabric[deepspeed]')"
)
# a cold cache compiles DeepSpeed's op first (minutes on 2 busy cores); each launch has its own timeout
pytestmark = pytest.mark.timeout(900)
# spec/001's example, verbatim
SPEC_CONFIG = {
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    "train_micro_batch_size_per_gpu": 1,
}


def test_the_deepspeed_names_come_registered() -> None:
    assert set(NAMES) <= set(STRATEGY_REGISTRY.available_strategies())


# ----- without any rank ---------------------------------------------------------------------------
def test_zero_config_from_arguments() -> None:
    assert build_zero_config(stage=1) == {"zero_optimization": {"stage": 1}}
    config = build_zero_config(stage=3, offload_optimizer=True, offload_parameters=True, overlap_comm=False)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is False
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_param"]["max_in_cpu"] == 1_000_000_000 and "aio" not in config
    nvme = build_zero_config(stage=3, offload_parameters=True, offload_params_device="nvme", nvme_path="/nv",
                             queue_depth=4)  # fmt: skip
    assert nvme["zero_optimization"]["offload_param"]["nvme_path"] == "/nv" and nvme["aio"]["queue_depth"] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stage": 4}, "stages are 0"),
        ({"stage": 2, "offload_parameters": True}, "needs stage=3"),
        ({"stage": 3, "offload_optimizer": True, "offload_optimizer_device": "nvme"}, "needs nvme_path"),
        ({"stage": 2, "offload_optimizer": True, "offload_optimizer_device": "disk"}, "'cpu' or 'nvme'"),
    ],
)
def test_zero_config_rejects_impossible_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_zero_config(**kwargs)


def test_precision_mapping() -> None:
    assert DeepSpeedPrecision("bf16-mixed").config_section() == {"bf16": {"enabled": True}}
    assert DeepSpeedPrecision("bf16-true").config_section() == {"bf16": {"enabled": True}}
    fp16 = DeepSpeedPrecision("16-mixed").config_section(initial_scale_power=8)["fp16"]
    assert fp16["enabled"] is True and fp16["loss_scale"] == 0.0 and fp16["initial_scale_power"] == 8
    assert DeepSpeedPrecision("32-true").config_section() == {}
    # what the connector resolves precision= to becomes the DeepSpeed plugin
    assert to_deepspeed_precision(MixedPrecision("bf16-mixed", device_type="cpu")).precision == "bf16-mixed"
    assert to_deepspeed_precision(TruePrecision("bf16-true")).precision == "bf16-true"
    assert to_deepspeed_precision(Precision()).precision == "32-true"
    with pytest.raises(ValueError, match="DeepSpeed does not support precision='64-true'"):
        DeepSpeedPrecision("64-true")
    with pytest.raises(ValueError, match="cannot use"):
        to_deepspeed_precision(TruePrecision("64-true"))
    # inputs go to the engine's dtype, outputs come back in the default dtype
    bf16 = DeepSpeedPrecision("bf16-mixed")
    data = bf16.convert_input({"x": torch.ones(2), "i": torch.ones(2, dtype=torch.long)})
    assert data["x"].dtype == torch.bfloat16 and data["i"].dtype == torch.long
    assert bf16.convert_output(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32


def test_without_deepspeed_installed_the_error_says_how_to_install(tmp_path: Path) -> None:
    """A Python where ``import deepspeed`` fails: the import of notebook_fabric still works and never
    imports deepspeed; building the strategy (by class or by name) says what to install."""
    code = textwrap.dedent(
        """
        import sys
        import notebook_fabric
        from notebook_fabric.strategies import deepspeed as ds_module
        assert "deepspeed" not in sys.modules, "import notebook_fabric imported deepspeed"
        sys.modules["deepspeed"] = None  # from here on, `import deepspeed` fails as if it were not installed
        from notebook_fabric.strategies import STRATEGY_REGISTRY
        for build in (lambda: ds_module.DeepSpeedStrategy(stage=3),
                      lambda: notebook_fabric.Fabric(accelerator="cpu", devices=1, strategy="deepspeed_stage_3")):
            try:
                build()
            except ImportError as error:
                print("ERROR:", error)
            else:
                raise SystemExit("no ImportError")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2
    assert all("pip install 'notebook-fabric[deepspeed]'" in line for line in errors), errors


def test_registered_names() -> None:
    for name in NAMES:
        assert STRATEGY_REGISTRY.get(name) is DeepSpeedStrategy
    assert STRATEGY_REGISTRY.get_init_params("deepspeed_stage_3_offload") == {
        "stage": 3, "offload_optimizer": True, "offload_parameters": True
    }  # fmt: skip


@needs_deepspeed
@pytest.mark.usefixtures("clean_environment")
def test_strategy_configuration() -> None:
    """In one process, no engine: names -> stages, config precedence, the filled-in defaults."""
    assert STRATEGY_REGISTRY.create("deepspeed").zero_stage == 2
    assert STRATEGY_REGISTRY.create("deepspeed_stage_3").shards_parameters
    assert not STRATEGY_REGISTRY.create("deepspeed_stage_1").shards_parameters
    with pytest.warns(UserWarning, match=r"\['stage'\] are ignored: the config wins"):
        given = DeepSpeedStrategy(stage=1, config=SPEC_CONFIG)
    assert given.zero_stage == 3 and given.config == SPEC_CONFIG and given.config is not SPEC_CONFIG
    strategy = DeepSpeedStrategy(stage=2, precision=MixedPrecision("bf16-mixed", device_type="cpu"))
    assert isinstance(strategy.precision, DeepSpeedPrecision) and strategy.precision.precision == "bf16-mixed"
    filled = strategy.configure_deepspeed_config(strategy.config)
    assert filled == {
        "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
    }  # fmt: skip
    strategy.process_dataloader(torch.utils.data.DataLoader(range(10), batch_size=5))
    assert strategy.configure_deepspeed_config(strategy.config)["train_micro_batch_size_per_gpu"] == 5
    # what the user's config says is kept
    user = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 3, "fp16": {"enabled": False}}
    assert DeepSpeedStrategy(config=user).configure_deepspeed_config(user)["train_micro_batch_size_per_gpu"] == 3
    assert "bf16" not in strategy.configure_deepspeed_config(user)
    # a global batch size: DeepSpeed derives the micro batch from it (no accumulation unless asked)
    derived = strategy.configure_deepspeed_config({"train_batch_size": 8})
    assert derived["gradient_accumulation_steps"] == 1 and "train_micro_batch_size_per_gpu" not in derived
    with pytest.raises(TypeError, match="unknown arguments \\['stagee'\\]"):
        DeepSpeedStrategy(stagee=3)
    with pytest.raises(FileNotFoundError, match="no DeepSpeed config file"):
        DeepSpeedStrategy(config="/nonexistent/ds.json")
    fabric = Fabric(accelerator="cpu", devices=2, strategy="deepspeed_stage_3", precision="bf16-true")
    assert isinstance(fabric.strategy, DeepSpeedStrategy) and fabric.strategy.precision.precision == "bf16-true"
    with pytest.raises(ValueError, match="DeepSpeed"):
        Fabric(accelerator="cpu", devices=2, strategy="deepspeed", precision="64-true")
    assert "deepspeed" not in sys.modules  # building strategies and Fabrics never imports it; ranks do


# ----- on 2 ranks ---------------------------------------------------------------------------------
def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randn(64, 8, generator=generator)
    return x, x[:, :4].sum(1, keepdim=True)


def train(fabric: Fabric, model: nn.Module, optimizer: Any, steps: int) -> list[float]:
    x, y = batch(fabric.global_rank)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def new_fabric(strategy: Any, precision: str = "32-true") -> Fabric:
    """Another Fabric in the running ranks (the process group exists already)."""
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, precision=precision)
    fabric.launch()
    return fabric


def setup_trainable(fabric: Fabric, init_module: bool = False) -> tuple[Any, Any]:
    torch.manual_seed(0)
    with fabric.init_module() if init_module else nullcontext():
        model = make_model()
    return fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))


def param_sums(fabric: Fabric, model: nn.Module) -> list[float]:
    """One number per tensor of the full (gathered under stage 3) state dict."""
    state = fabric.strategy.get_module_state_dict(model)
    return [round(float(value.float().sum()), 4) for value in state.values()]


def engine_facts(engine: Any) -> dict[str, Any]:
    zero = engine._config.zero_config
    return {
        "stage": engine.zero_optimization_stage(),
        "offload_optimizer": _name(zero.offload_optimizer.device) if zero.offload_optimizer else None,
        "offload_param": _name(zero.offload_param.device) if zero.offload_param else None,
        "bf16": engine.bfloat16_enabled(),
        "fp16": engine.fp16_enabled(),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "accumulation": engine.gradient_accumulation_steps(),
    }


def _name(device: Any) -> str:
    return str(getattr(device, "value", device))


def check_stage(stage: int) -> Callable[[Fabric, Path], dict]:
    def check(fabric: Fabric, folder: Path) -> dict:
        if stage != 1:  # stage 1 is the launch's own Fabric
            fabric = new_fabric(f"deepspeed_stage_{stage}")
        model, optimizer = setup_trainable(fabric, init_module=stage == 3)
        partitioned = [p.numel() == 0 and p.ds_numel > 0 for p in model.parameters()] if stage == 3 else []
        losses = train(fabric, model, optimizer, steps=25)
        return {"losses": losses, "sums": param_sums(fabric, model), "facts": engine_facts(model._forward_module),
                "partitioned": partitioned}  # fmt: skip

    return check


def check_arguments_bf16(fabric: Fabric, folder: Path) -> dict:
    fabric = new_fabric(DeepSpeedStrategy(stage=2, offload_optimizer=True, reduce_bucket_size=10_000), "bf16-mixed")
    model, optimizer = setup_trainable(fabric)
    x, _ = batch(fabric.global_rank)
    output = model(x)
    losses = train(fabric, model, optimizer, steps=25)
    engine = model._forward_module
    return {
        "losses": losses, "facts": engine_facts(engine), "bucket": engine._config.zero_config.reduce_bucket_size,
        "param_dtype": str(next(engine.module.parameters()).dtype), "output_dtype": str(output.dtype),
    }  # fmt: skip


def check_checkpoint(fabric: Fabric, folder: Path) -> dict:
    fabric = new_fabric("deepspeed_stage_3")
    model, optimizer = setup_trainable(fabric, init_module=True)
    probe = torch.linspace(-1, 1, 16).reshape(2, 8)
    train(fabric, model, optimizer, steps=3)
    fabric.save(folder / "ckpt", {"model": model, "optimizer": optimizer, "step": 3, "notes": "hello", "extra": [1, 2]})
    saved_output = model(probe).detach()
    after_save = train(fabric, model, optimizer, steps=3)  # moves away from the checkpoint
    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(folder / "ckpt", state)
    loaded_output = model(probe).detach()
    after_load = train(fabric, model, optimizer, steps=3)  # the same steps again: optimizer state restored too
    consolidated = folder / "consolidated.ckpt"
    if fabric.global_rank == 0:
        consolidate_checkpoint(folder / "ckpt", consolidated)
    fabric.barrier()
    plain = make_model()
    contents = torch.load(consolidated, weights_only=False)
    plain.load_state_dict(contents["model"])
    # a consolidated file loads into a (partitioned) DeepSpeed model too
    fabric.load(consolidated, {"model": model})
    reloaded_output = model(probe).detach()
    missing_optimizer = None
    try:
        fabric.load(folder / "ckpt", {"model": model, "optimizer": optimizer, "step": 0, "absent": 1})
    except KeyError as error:
        missing_optimizer = str(error)
    return {
        "step": state["step"], "remainder": remainder, "same_output": torch.allclose(saved_output, loaded_output),
        "after_save": after_save, "after_load": after_load,
        "consolidated_keys": sorted(contents), "client_key_hidden": CLIENT_STATE_KEY not in contents,
        "plain_matches": torch.allclose(plain(probe), saved_output, atol=1e-6),
        "reloaded_matches": torch.allclose(reloaded_output, saved_output, atol=1e-6),
        "strict_error": missing_optimizer, "files": sorted(p.name for p in (folder / "ckpt").iterdir()),
    }  # fmt: skip


def check_errors(fabric: Fabric, folder: Path) -> dict:
    errors: dict[str, Any] = {}
    other = new_fabric("deepspeed_stage_2")
    torch.manual_seed(0)
    model = make_model()
    first, second = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
    ready_model = make_model()
    ready, ready_optimizer = other.setup(ready_model, torch.optim.SGD(ready_model.parameters(), lr=0.1))
    for name, action in {
        "two_optimizers": lambda: other.setup(model, first, second),
        "clip_norm": lambda: other.clip_gradients(ready, ready_optimizer, max_norm=1.0),
        "clip_value": lambda: other.clip_gradients(ready, ready_optimizer, clip_val=0.5),
        "setup_optimizers": lambda: other.setup_optimizers(first),
    }.items():
        try:
            action()
        except (ValueError, NotImplementedError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with other.no_backward_sync(ready):
            pass
    errors["no_backward_sync"] = " | ".join(str(w.message) for w in caught)
    # a model alone: an engine for inference
    inference = new_fabric(DeepSpeedStrategy(stage=2, offload_optimizer=True)).setup(make_model())
    errors["inference_output"] = list(inference(torch.ones(3, 8)).shape)
    return errors


RANK_CHECKS = {
    "stage1": check_stage(1),
    "stage2": check_stage(2),
    "stage3": check_stage(3),
    "arguments_bf16": check_arguments_bf16,
    "checkpoint": check_checkpoint,
    "errors": check_errors,
}


def rank_checks(fabric: Fabric, folder: Path) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    results = {}
    for name, check in RANK_CHECKS.items():
        try:
            results[name] = check(fabric, folder)
        except Exception:  # noqa: BLE001 - report it with the others; the test for this check fails
            results[name] = {"traceback": traceback.format_exc()}
        fabric.barrier(name)
    return results


def spec_example(fabric: Fabric) -> dict:
    """spec/001's DeepSpeedStrategy(config=...) example as the launch's strategy, trained in bf16."""
    model, optimizer = setup_trainable(fabric)
    losses = train(fabric, model, optimizer, steps=25)
    # a model alone (no optimizer): a ZeRO-3 engine for inference, its parameters partitioned
    torch.manual_seed(0)
    plain = make_model()
    inference = fabric.setup(make_model_like(plain))
    probe = torch.linspace(-1, 1, 16).reshape(2, 8)
    return {"losses": losses, "facts": engine_facts(model._forward_module), "sums": param_sums(fabric, model),
            "inference_stage": inference._forward_module.zero_optimization_stage(),
            "inference_partitioned": all(p.numel() == 0 for p in inference._forward_module.module.parameters()),
            "inference_matches": torch.allclose(inference(probe), plain(probe), atol=2e-2)}  # fmt: skip


def make_model_like(model: nn.Module) -> nn.Module:
    copy = make_model()
    copy.load_state_dict(model.state_dict())
    return copy


@pytest.fixture(scope="module")
def built_ops() -> None:
    """DeepSpeed's CPU op, built once here (seconds when CI built it already with the same script)."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_deepspeed_ops.py")], capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def ranks(built_ops: None, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("deepspeed")
    with clean_rank_environment():
        results = notebook_fabric.launch(rank_checks, folder, devices=2, accelerator="cpu",
                                         strategy="deepspeed_stage_1", return_all=True, timeout=400)  # fmt: skip
    assert wait_no_children() == []
    return results


def result(ranks: list[dict], name: str) -> tuple[dict, dict]:
    for rank in ranks:
        assert "traceback" not in rank[name], rank[name]["traceback"]
    return ranks[0][name], ranks[1][name]


def assert_learns(losses: list[float]) -> None:
    assert losses[-1] < 0.5 * losses[0], losses


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains(ranks: list[dict], stage: int) -> None:
    zero, one = result(ranks, f"stage{stage}")
    assert_learns(zero["losses"]) and assert_learns(one["losses"])
    assert zero["losses"] != one["losses"]  # each rank its own data ...
    assert zero["sums"] == one["sums"]  # ... one model
    assert zero["facts"]["stage"] == stage and zero["facts"]["micro_batch"] == 1 and not zero["facts"]["bf16"]
    if stage == 3:  # created partitioned by init_module() (deepspeed.zero.Init)
        assert zero["partitioned"] and all(zero["partitioned"])


@needs_deepspeed
def test_zero_stages_agree(ranks: list[dict]) -> None:
    """Same data, same seed, fp32: stages partition differently but compute the same training run."""
    runs = [result(ranks, f"stage{stage}")[0] for stage in (1, 2, 3)]
    for run in runs[1:]:
        assert run["losses"] == pytest.approx(runs[0]["losses"], rel=1e-4)


@needs_deepspeed
def test_arguments_reach_the_engine_and_bf16_trains(ranks: list[dict]) -> None:
    zero, one = result(ranks, "arguments_bf16")
    assert zero["facts"] == {"stage": 2, "offload_optimizer": "cpu", "offload_param": None, "bf16": True,
                             "fp16": False, "micro_batch": 1, "accumulation": 1}  # fmt: skip
    assert zero["bucket"] == 10_000
    assert zero["param_dtype"] == "torch.bfloat16" and zero["output_dtype"] == "torch.float32"
    assert_learns(zero["losses"]) and assert_learns(one["losses"])


@needs_deepspeed
def test_checkpoint_round_trip(ranks: list[dict]) -> None:
    zero, one = result(ranks, "checkpoint")
    for rank in (zero, one):
        assert rank["step"] == 3  # restored in place
        assert rank["remainder"] == {"notes": "hello", "extra": [1, 2]}  # returned
        assert rank["same_output"]
        assert rank["after_load"] == pytest.approx(rank["after_save"], rel=1e-5)  # optimizer state restored
        assert rank["plain_matches"] and rank["reloaded_matches"]
        assert rank["strict_error"] is not None and "absent" in rank["strict_error"]
    assert zero["consolidated_keys"] == ["extra", "model", "notes", "step"] and zero["client_key_hidden"]
    assert "checkpoint" in zero["files"] and "latest" in zero["files"]


@needs_deepspeed
def test_clear_errors(ranks: list[dict]) -> None:
    errors, _ = result(ranks, "errors")
    assert errors["two_optimizers"].startswith("ValueError: DeepSpeed drives exactly one optimizer per model, got 2")
    assert "NotImplementedError" in errors["clip_norm"] and "'gradient_clipping': 1.0" in errors["clip_norm"]
    assert "NotImplementedError" in errors["clip_value"] and "gradient_clipping" in errors["clip_value"]
    assert "fabric.setup(model, optimizer)" in errors["setup_optimizers"]
    assert "cannot skip gradient synchronisation" in errors["no_backward_sync"]
    assert errors["inference_output"] == [3, 1]


@pytest.fixture(scope="module")
def spec_ranks(built_ops: None) -> list[dict]:
    with clean_rank_environment():
        strategy = DeepSpeedStrategy(config=SPEC_CONFIG)
        results = notebook_fabric.launch(spec_example, devices=2, accelerator="cpu", strategy=strategy,
                                         precision="bf16-mixed", return_all=True, timeout=300)  # fmt: skip
    assert wait_no_children() == []
    return results


@needs_deepspeed
def test_spec_config_example_reaches_the_engine(spec_ranks: list[dict]) -> None:
    zero, one = spec_ranks
    assert zero["facts"] == {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu", "bf16": True,
                             "fp16": False, "micro_batch": 1, "accumulation": 1}  # fmt: skip
    assert_learns(zero["losses"]) and assert_learns(one["losses"])
    assert zero["sums"] == one["sums"]
    for rank in (zero, one):
        assert rank["inference_stage"] == 3 and rank["inference_partitioned"] and rank["inference_matches"]
