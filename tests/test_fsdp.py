"""FSDPStrategy (FSDP2) on 2 real CPU ranks over gloo, started with ``notebook_fabric.launch``.

Each launch costs seconds, so one rank function runs many checks and returns what it saw; the
tests below assert on those values (rank 0's and rank 1's side by side).
"""
from __future__ import annotations

from functools import partial
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
from notebook_fabric.precision import MixedPrecision
from notebook_fabric.strategies import STRATEGY_REGISTRY
from notebook_fabric.strategies.fsdp import FSDPStrategy, select_modules
from notebook_fabric.strategies.dtensor import rebuild_optimizer

pytestmark = pytest.mark.timeout(240)


def test_the_fsdp_names_come_registered() -> None:
    assert {"fsdp", "fsdp_cpu_offload"} <= set(STRATEGY_REGISTRY.available_strategies())


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


class Decoder(nn.Module):
    """spec/002's FSDP example in miniature: decoder layers between an input and an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.out = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, h)
        return self.out(h)


def regression_data(rank: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(32, 4, generator=generator)
    return x, torch.stack([x[:, 0] * 2 - x[:, 1], x[:, 2] + x[:, 3]], dim=1)


def full_grad_norm(model: nn.Module) -> Tensor:
    return torch.linalg.vector_norm(torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()]))


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optimizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["state"].keys() != b["state"].keys() or len(a["param_groups"]) != len(b["param_groups"]):
        return False
    return all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


# ----- rank functions ----------------------------------------------------------------------------
def train_and_checkpoint(fabric: Fabric, folder: Path, single_ckpt: Path) -> dict[str, Any]:
    """Meta init, sharding, training, clipping, no_backward_sync, full and sharded checkpoints."""
    from torch.distributed.tensor import DTensor

    seen: dict[str, Any] = {"strategy": repr(fabric.strategy)}
    torch.manual_seed(0)
    with fabric.init_module(empty_init=True):
        model = mlp()
    seen["meta_before"] = all(p.is_meta for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model, optimizer = fabric.setup(model, optimizer)
    params = list(model.parameters())
    seen["meta_after"] = any(p.is_meta for p in params)
    seen["optimizer_over_shards"] = all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    seen["optimizer_class"] = isinstance(optimizer, torch.optim.Adam)
    seen["shards"] = {name: (p.to_local().numel(), p.numel()) for name, p in model.named_parameters()}
    seen["init"] = dist_ckpt.model_state(model, full=True, rank0_only=False)

    x, y = regression_data(fabric.global_rank)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, y), batch_size=8))
    losses = []
    for _ in range(12):
        for xb, yb in loader:
            loss = nn.functional.mse_loss(model(xb), yb)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    seen["losses"] = losses

    def loss_of(batch: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(batch), y[: len(batch)])

    fabric.backward(loss_of(x))
    expected = full_grad_norm(model)
    norm = fabric.clip_gradients(model, optimizer, max_norm=0.01)
    seen["clip"] = {"norm": norm, "expected": expected, "plain": type(norm) is Tensor, "after": full_grad_norm(model)}
    optimizer.zero_grad()

    for batch in (x[:8], x[8:16]):
        fabric.backward(loss_of(batch))
    synced = [p.grad.full_tensor().clone() for p in params]
    optimizer.zero_grad()
    with fabric.no_backward_sync(model):
        fabric.backward(loss_of(x[:8]))
    seen["no_grads_while_skipped"] = all(p.grad is None for p in params)
    fabric.backward(loss_of(x[8:16]))
    accumulated = [p.grad.full_tensor() for p in params]
    seen["accumulated_like_synced"] = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(synced, accumulated))
    optimizer.zero_grad()

    fabric.save(folder / "full.ckpt", {"model": model, "optimizer": optimizer, "step": 7})
    seen["saved"] = dist_ckpt.model_state(model, full=True, rank0_only=False)
    seen["saved_optimizer"] = dist_ckpt.optimizer_state(model, optimizer, full=True, rank0_only=False)

    fabric.strategy.state_dict_type = "sharded"
    fabric.save(folder / "sharded", {"model": model, "optimizer": optimizer, "step": 8, "note": "hi"})
    fabric.backward(loss_of(x))  # move the weights and the optimizer on, then restore
    optimizer.step()
    optimizer.zero_grad()
    seen["moved"] = not same(dist_ckpt.model_state(model, full=True, rank0_only=False), seen["saved"])
    remainder = fabric.load(folder / "sharded", {"model": model, "optimizer": optimizer, "step": 0})
    seen["sharded_remainder"] = remainder
    seen["sharded_model"] = same(dist_ckpt.model_state(model, full=True, rank0_only=False), seen["saved"])
    restored = dist_ckpt.optimizer_state(model, optimizer, full=True, rank0_only=False)
    seen["sharded_optimizer"] = same_optimizer(restored, seen["saved_optimizer"])

    fabric.strategy.state_dict_type = "full"
    seen["full_remainder"] = fabric.load(folder / "full.ckpt", {"model": model, "optimizer": optimizer})
    seen["full_roundtrip"] = same(dist_ckpt.model_state(model, full=True, rank0_only=False), seen["saved"])
    fabric.load(single_ckpt, {"model": model, "optimizer": optimizer})
    seen["from_single"] = dist_ckpt.model_state(model, full=True, rank0_only=False)
    seen["from_single_optimizer"] = dist_ckpt.optimizer_state(model, optimizer, full=True, rank0_only=False)
    return seen


def wrapped_and_checkpointed(fabric: Fabric, folder: Path) -> dict[str, Any]:
    """bf16-mixed, auto_wrap_policy and activation_checkpointing_policy sets, forward prefetch."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    torch.manual_seed(0)
    plain = Decoder().state_dict()
    torch.manual_seed(0)
    with fabric.init_module(empty_init=True):
        model = Decoder()
    calls: list[int] = []
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    inner = model._forward_module
    seen: dict[str, Any] = {
        "init_like_plain": same(dist_ckpt.model_state(model, full=True, rank0_only=False), plain),
        "units": sorted(type(m).__name__ for m in inner.modules() if isinstance(m, FSDPModule)),
        "checkpointed": [
            type(m._checkpoint_wrapped_module).__name__ for m in inner.modules() if isinstance(m, CheckpointWrapper)
        ],
        "reshard_after_forward": fabric.strategy.reshard_after_forward,
    }
    x = torch.randn(8, 5, 4, generator=torch.Generator().manual_seed(fabric.global_rank))
    y = x.sum(-1, keepdim=True)
    losses = []
    for _ in range(8):
        out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    seen.update(losses=losses, output_dtype=out.dtype, forward_calls=len(calls))
    seen["param_dtype"] = next(model.parameters()).dtype
    fabric.save(folder / "decoder.ckpt", {"model": model})
    seen["keys_match_plain_model"] = list(dist_ckpt.model_state(model, full=True, rank0_only=False)) == list(plain)
    return seen


def half_precision_offload(fabric: Fabric) -> dict[str, Any]:
    """16-mixed (a sharded grad scaler), CPU offload, HYBRID_SHARD's 2-D mesh, sync_module_states,
    and the two-step setup: setup_module, then setup_optimizers with an optimizer made before it."""
    torch.manual_seed(fabric.global_rank)  # different weights on each rank: sync_module_states makes rank 0's win
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(optimizer)
    seen: dict[str, Any] = {"init": dist_ckpt.model_state(model, full=True, rank0_only=False)}
    x, y = regression_data(fabric.global_rank)
    losses, norms = [], []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x).float(), y)
        fabric.backward(loss * 200)  # large enough that the first scaled float16 gradients overflow
        norms.append(fabric.clip_gradients(model, optimizer, max_norm=5.0, error_if_nonfinite=False).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    fabric.backward(nn.functional.mse_loss(model(x).float(), y))
    fabric.clip_gradients(model, optimizer, clip_val=1e-4)
    seen["largest_clipped"] = max(p.grad.full_tensor().abs().max().item() for p in model.parameters())
    seen.update(
        scaler=type(fabric.strategy.precision.scaler).__name__,
        scale=fabric.strategy.precision.scaler.get_scale(),
        losses=losses,
        mesh=fabric.strategy.device_mesh.mesh_dim_names,
        device=next(model.parameters()).device.type,
        skipped_steps=sum(1 for n in norms if n != n or n == float("inf")),
    )
    return seen


def load_sharded_on_one_rank(fabric: Fabric, folder: Path) -> dict[str, Any]:
    model = mlp()
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.02))
    remainder = fabric.load(folder / "sharded", {"model": model, "optimizer": optimizer})
    return {
        "world": fabric.world_size,
        "remainder": remainder,
        "model": dist_ckpt.model_state(model, full=True, rank0_only=False),
        "optimizer": dist_ckpt.optimizer_state(model, optimizer, full=True, rank0_only=False),
    }


# ----- the launches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("fsdp")
    with clean_rank_environment():
        single = Fabric(accelerator="cpu", devices=1)
        torch.manual_seed(3)
        model = mlp()
        model, optimizer = single.setup(model, torch.optim.Adam(model.parameters(), lr=0.02))
        single.backward(model(torch.randn(5, 4)).sum())
        optimizer.step()
        single.save(folder / "single.ckpt", {"model": model, "optimizer": optimizer})
        expected_single = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        ranks = launch(train_and_checkpoint, folder, folder / "single.ckpt", devices=2, accelerator="cpu",
                       strategy="fsdp", return_all=True)  # fmt: skip
        one_rank = launch(load_sharded_on_one_rank, folder, devices=1, accelerator="cpu", strategy="fsdp")
    return {"ranks": ranks, "folder": folder, "single": expected_single, "one_rank": one_rank}


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("fsdp_features")
    strategy = FSDPStrategy(
        auto_wrap_policy={nn.TransformerDecoderLayer},
        activation_checkpointing_policy={nn.TransformerDecoderLayer},
        sharding_strategy="SHARD_GRAD_OP",
        forward_prefetch=True,
    )
    offload = FSDPStrategy(cpu_offload=True, sharding_strategy="HYBRID_SHARD", sync_module_states=True)
    with clean_rank_environment():
        wrapped = launch(wrapped_and_checkpointed, folder, devices=2, accelerator="cpu", strategy=strategy,
                         precision="bf16-mixed", return_all=True)  # fmt: skip
        # float16 autocast and loss scaling on the CPU need the plugin itself (precision="16-mixed" means bf16 there)
        half = launch(half_precision_offload, devices=2, accelerator="cpu", strategy=offload,
                      plugins=[MixedPrecision("16-mixed", device_type="cpu")], return_all=True)  # fmt: skip
    return {"wrapped": wrapped, "half": half, "folder": folder}


# ----- training and sharding ---------------------------------------------------------------------
def test_meta_init_is_materialised_after_sharding_with_the_plain_init_values(trained):
    rank0, rank1 = trained["ranks"]
    assert rank0["meta_before"] and not rank0["meta_after"]
    torch.manual_seed(0)
    assert same(rank0["init"], mlp().state_dict())  # one layer at a time, whole: no repeated shards
    assert same(rank0["init"], rank1["init"])


def test_parameters_are_sharded_in_halves_and_the_optimizer_holds_the_shards(trained):
    for seen in trained["ranks"]:
        assert seen["optimizer_over_shards"] and seen["optimizer_class"]
        for name, (local, total) in seen["shards"].items():
            assert local * 2 == total, name
    assert "start_method=popen" in trained["ranks"][0]["strategy"]


def test_training_lowers_the_loss_identically_on_both_ranks_and_the_full_state_agrees(trained):
    rank0, rank1 = trained["ranks"]
    losses = rank0["losses"]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    assert same(rank0["saved"], rank1["saved"])


def test_clip_gradients_returns_the_norm_of_the_gathered_gradients(trained):
    for seen in trained["ranks"]:
        clip = seen["clip"]
        assert clip["plain"]
        assert torch.allclose(clip["norm"], clip["expected"], rtol=1e-5)
        assert clip["expected"] > 0.01 and torch.allclose(clip["after"], torch.tensor(0.01), rtol=1e-3)


def test_no_backward_sync_defers_the_reduction_to_the_next_synced_backward(trained):
    for seen in trained["ranks"]:
        assert seen["no_grads_while_skipped"]
        assert seen["accumulated_like_synced"]


# ----- checkpoints -------------------------------------------------------------------------------
def test_full_checkpoint_from_fsdp_loads_into_a_single_device_fabric(trained):
    rank0 = trained["ranks"][0]
    with clean_rank_environment():
        fabric = Fabric(accelerator="cpu", devices=1)
        model = mlp()
        model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.02))
        remainder = fabric.load(trained["folder"] / "full.ckpt", {"model": model, "optimizer": optimizer})
    assert remainder == {"step": 7}
    assert same(model.state_dict(), rank0["saved"])
    assert same_optimizer(optimizer.state_dict(), rank0["saved_optimizer"])
    assert set(optimizer.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_full_checkpoint_from_a_single_device_loads_into_fsdp(trained):
    expected = trained["single"]
    for seen in trained["ranks"]:
        assert same(seen["from_single"], expected["model"])
        assert same_optimizer(seen["from_single_optimizer"], expected["optimizer"])
        assert seen["full_roundtrip"] and seen["full_remainder"] == {"step": 7}


def test_sharded_checkpoint_round_trip_on_two_ranks(trained):
    folder = trained["folder"] / "sharded"
    assert folder.is_dir() and (folder / ".metadata").is_file() and (folder / "meta.pt").is_file()
    for seen in trained["ranks"]:
        assert seen["moved"]
        assert seen["sharded_model"] and seen["sharded_optimizer"]
        assert seen["sharded_remainder"] == {"note": "hi"}


def test_sharded_checkpoint_loads_on_another_world_size_and_consolidates(trained, tmp_path):
    one, rank0 = trained["one_rank"], trained["ranks"][0]
    assert one["world"] == 1 and one["remainder"] == {"step": 8, "note": "hi"}
    assert same(one["model"], rank0["saved"])
    assert same_optimizer(one["optimizer"], rank0["saved_optimizer"])
    target = dist_ckpt.consolidate(trained["folder"] / "sharded", tmp_path / "one.ckpt")
    checkpoint = torch.load(target, weights_only=False)
    assert same(checkpoint["model"], rank0["saved"]) and checkpoint["step"] == 8


def test_loading_a_sharded_directory_without_a_target_says_how(trained):
    strategy = FSDPStrategy()
    with pytest.raises(ValueError, match="pass the objects to restore.*consolidate"):
        strategy.load_checkpoint(trained["folder"] / "sharded")


# ----- wrapping, checkpointing, precision --------------------------------------------------------
def test_auto_wrap_and_activation_checkpointing_policies_under_bf16(features):
    for seen in features["wrapped"]:
        assert seen["init_like_plain"]  # meta init, materialised children first (MultiheadAttention included)
        assert seen["units"] == ["FSDPCheckpointWrapper", "FSDPCheckpointWrapper", "FSDPDecoder"]
        assert seen["checkpointed"] == ["TransformerDecoderLayer", "TransformerDecoderLayer"]
        assert seen["forward_calls"] == 2 * len(seen["losses"])  # every layer forward runs again in backward
        assert seen["output_dtype"] == torch.float32 and seen["param_dtype"] == torch.float32  # outputs back in fp32
        assert seen["losses"][-1] < 0.5 * seen["losses"][0]
        assert seen["reshard_after_forward"] is False and seen["keys_match_plain_model"]
    checkpoint = torch.load(features["folder"] / "decoder.ckpt", weights_only=True)
    plain = Decoder()
    plain.load_state_dict(checkpoint["model"])  # activation checkpointing leaves the names alone


def test_16_mixed_uses_a_sharded_scaler_with_cpu_offload_and_hybrid_mesh(features):
    rank0, rank1 = features["half"]
    assert rank0["scaler"] == "ShardedGradScaler" and rank0["mesh"] == ("replicate", "shard")
    assert rank0["device"] == "cpu"
    assert rank0["skipped_steps"] >= 1  # the first steps overflow at the initial scale and are skipped...
    assert rank0["skipped_steps"] == rank1["skipped_steps"]  # ...on every rank
    assert rank0["scale"] == rank1["scale"] < 2.0**16
    assert rank0["losses"][-1] < 0.5 * rank0["losses"][0]
    assert rank0["largest_clipped"] <= 1e-4


def test_sync_module_states_and_an_optimizer_set_up_after_the_module(features):
    rank0, rank1 = features["half"]
    torch.manual_seed(0)
    assert same(rank0["init"], mlp().state_dict()) and same(rank1["init"], rank0["init"])


def test_no_rank_survives_the_launches(trained, features):
    assert wait_no_children() == []


# ----- arguments, in this process ----------------------------------------------------------------
def test_registered_names_and_fabric_wiring(clean_environment):
    fabric = Fabric(accelerator="cpu", devices=2, strategy="fsdp", precision="bf16-mixed")
    strategy = fabric.strategy
    assert isinstance(strategy, FSDPStrategy) and strategy.start_method == "popen" and strategy.shards_parameters
    assert strategy.world_size == 2 and strategy.process_group_backend == "gloo"
    policy = strategy.mixed_precision_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert STRATEGY_REGISTRY.create("fsdp_cpu_offload").cpu_offload is True
    with pytest.raises(RuntimeError, match="fabric.launch"):
        strategy.device_mesh  # noqa: B018


def test_fsdp1_style_arguments_are_mapped():
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy, StateDictType

    strategy = FSDPStrategy(
        cpu_offload=CPUOffload(offload_params=True),
        mixed_precision=MixedPrecision(torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16),
        sharding_strategy=ShardingStrategy.SHARD_GRAD_OP,
        state_dict_type=StateDictType.SHARDED_STATE_DICT,
        use_orig_params=False,
        limit_all_gathers=False,
    )
    assert strategy.cpu_offload and strategy.reshard_after_forward is False and strategy.state_dict_type == "sharded"
    policy = strategy.mixed_precision_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.bfloat16


def test_wrap_policies_pick_submodules_children_first():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy, transformer_auto_wrap_policy

    model = Decoder()
    layers = list(model.layers)
    assert select_modules(model, {nn.TransformerDecoderLayer}) == layers
    by_class = partial(transformer_auto_wrap_policy, transformer_layer_cls={nn.TransformerDecoderLayer})
    assert select_modules(model, by_class) == layers
    assert select_modules(model, ModuleWrapPolicy({nn.TransformerDecoderLayer})) == layers
    assert select_modules(model, lambda m: isinstance(m, nn.TransformerDecoderLayer)) == layers
    assert select_modules(model, partial(size_based_auto_wrap_policy, min_num_params=1000)) == layers
    assert select_modules(model, None) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sharding_strategy": "NO_SHARD"}, ValueError, "strategy='ddp'"),
        ({"sharding_strategy": "HALF"}, ValueError, "FULL_SHARD"),
        ({"state_dict_type": "local"}, ValueError, "'full'.*'sharded'"),
        ({"auto_wrap_policy": {"Linear"}}, TypeError, "nn.Module subclasses"),
        ({"auto_wrap_policy": 3}, TypeError, "set of module classes"),
        ({"activation_checkpointing": True}, ValueError, "activation_checkpointing_policy=\\{MyBlock\\}"),
        ({"activation_checkpointing": False, "activation_checkpointing_policy": {nn.Linear}}, ValueError, "contradict"),
        ({"cpu_offload": "yes"}, TypeError, "True/False"),
        ({"bucket_cap_mb": 25}, TypeError, "fully_shard"),
        ({"start_method": "thread"}, ValueError, "start_method"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        FSDPStrategy(**kwargs)


def test_an_unbound_fsdp1_policy_and_a_bad_mixed_precision_say_what_to_pass():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    with pytest.raises(ValueError, match="transformer_layer_cls.*functools.partial"):
        FSDPStrategy(auto_wrap_policy=transformer_auto_wrap_policy)
    with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
        FSDPStrategy(mixed_precision="bf16").mixed_precision_policy()


def test_an_optimizer_over_foreign_parameters_is_refused():
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no model set up by this strategy"):
        rebuild_optimizer(optimizer, {}, {id(p) for p in model.parameters()})
    same_params = torch.optim.SGD(model.parameters(), lr=0.1)
    assert rebuild_optimizer(same_params, {}, {id(p) for p in model.parameters()}) is same_params
