"""``xla`` on 2 devices of torch_xla's CPU device, through ``launch(fn)`` and ``Fabric.launch(fn)``:
collectives, a data-parallel step against the full-batch eager step, bf16, debug mode, failures."""
from __future__ import annotations

import time
from typing import Any, Dict

import pytest

pytest.importorskip("torch_xla", reason="needs torch_xla: run scripts/xla_env.sh (its own venv, torch 2.9.0)")

from xla_fixtures import no_process_left  # noqa: E402,F401 (autouse: no rank process is left)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from notebook_fabric import Fabric, launch  # noqa: E402
from notebook_fabric.collectives.debug import CollectiveMismatchError  # noqa: E402
from notebook_fabric.launching.errors import RankDiedError  # noqa: E402
from xla_models import LR, STEPS, build_model, eager_training, fabric_training_losses, initial_state, shard  # noqa: E402


def collectives(fabric: Any) -> Dict[str, Any]:
    rank = fabric.global_rank
    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    out = {
        "world_size": fabric.world_size,
        "device": fabric.device.type,
        "sum": fabric.all_reduce(x, reduce_op="sum"),
        "mean": fabric.all_reduce(x),
        "max": fabric.all_reduce(x, reduce_op="max"),
        "scalar": fabric.all_reduce(torch.tensor(rank), reduce_op="sum"),  # 0-dim, 0 on one rank and 1 on the other
        "gather": fabric.all_gather(torch.tensor([float(rank), 10.0 * rank])),
        "broadcast": fabric.broadcast(torch.tensor([rank + 5.0]), src=1),
        "object": fabric.broadcast({"from": rank, "text": "x" * (rank + 3)}, src=1),
    }
    before = time.monotonic()
    if rank == 1:
        time.sleep(1.0)  # rank 0 must wait here for rank 1
    fabric.barrier("together")
    out["waited"] = time.monotonic() - before
    out["all_ranks_true"] = fabric.strategy.reduce_boolean_decision(rank >= 0)
    out["some_rank_true"] = fabric.strategy.reduce_boolean_decision(rank == 1, all=False)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def check_collectives(out: Dict[str, Any]) -> None:
    assert out["world_size"] == 2 and out["device"] == "xla"
    assert out["sum"].tolist() == [3.0, 6.0]
    assert out["mean"].tolist() == [1.5, 3.0]
    assert out["max"].tolist() == [2.0, 4.0]
    assert out["scalar"].tolist() == 1
    assert out["gather"].tolist() == [[0.0, 0.0], [1.0, 10.0]]
    assert out["broadcast"].tolist() == [6.0]
    assert out["object"] == {"from": 1, "text": "xxxx"}
    assert out["waited"] >= 0.9, out["waited"]  # the barrier held rank 0 until rank 1 came
    assert out["all_ranks_true"] is True and out["some_rank_true"] is True


def test_collectives_through_launch() -> None:
    check_collectives(launch(collectives, strategy="xla", devices=2))


def test_collectives_through_fabric_launch() -> None:
    check_collectives(Fabric(strategy="xla", devices=2).launch(collectives))


def data_parallel(fabric: Any, initial: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    with fabric.strategy._ranks.lock:  # the rank threads share one random generator
        model = build_model()
    model.load_state_dict(initial)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=LR))
    losses = fabric_training_losses(fabric, model, optimizer)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"losses": losses, "state": {k: v.cpu() for k, v in model.state_dict().items()},
            "every_rank": fabric.all_gather(flat).cpu()}  # fmt: skip


def test_data_parallel_step_equals_the_full_batch_step() -> None:
    initial = initial_state()
    result = launch(data_parallel, initial, strategy="xla", devices=2)
    expected_losses, expected_state = eager_training(initial)
    assert result["losses"] == pytest.approx(expected_losses, abs=1e-5)
    assert expected_losses[-1] < 0.8 * expected_losses[0]  # it trained
    for name, value in expected_state.items():
        torch.testing.assert_close(result["state"][name], value, atol=1e-5, rtol=1e-5)
    rows = result["every_rank"]
    torch.testing.assert_close(rows[0], rows[1], atol=0, rtol=0)  # both ranks hold the same parameters


def randomly_initialised(fabric: Any) -> Dict[str, Any]:
    # no seed and no shared state: the threads draw from one generator, so each builds different weights
    model = build_model()
    built = torch.cat([p.detach().flatten() for p in model.parameters()])
    model = fabric.setup_module(model)
    held = torch.cat([p.detach().flatten() for p in model.parameters()]).to(fabric.device)
    return {"built": fabric.all_gather(built.to(fabric.device)).cpu(), "held": fabric.all_gather(held).cpu()}


def test_setup_gives_every_rank_rank_zeros_parameters() -> None:
    result = launch(randomly_initialised, strategy="xla", devices=2)
    assert not torch.equal(result["built"][0], result["built"][1])  # the threads built different models
    torch.testing.assert_close(result["held"][1], result["built"][0], atol=0, rtol=0)  # rank 0's, on rank 1
    torch.testing.assert_close(result["held"][0], result["built"][0], atol=0, rtol=0)


def bf16_training(fabric: Any, initial: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    model = build_model()
    model.load_state_dict(initial)
    inside: list = []  # the dtype a layer computes in (Fabric hands the model's outputs back in float32)
    model[0].register_forward_hook(lambda module, args, output: inside.append(str(output.dtype)))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=LR))
    x, y = (t.to(fabric.device) for t in shard(fabric.global_rank, fabric.world_size))
    losses, output_dtype = [], None
    for _ in range(STEPS):
        output = model(x)
        output_dtype = inside[-1]
        loss = nn.functional.mse_loss(output.float(), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(fabric.all_reduce(loss.detach())))
    return {"losses": losses, "output": output_dtype, "parameter": str(next(model.parameters()).dtype)}


@pytest.mark.parametrize("precision, parameter", [("bf16-true", "torch.bfloat16"), ("bf16-mixed", "torch.float32")])
def test_bf16_on_xla(precision: str, parameter: str) -> None:
    initial = initial_state()
    result = launch(bf16_training, initial, strategy="xla", devices=2, precision=precision)
    assert result["output"] == "torch.bfloat16"  # the forward ran in bf16 (autocast, or a bf16 model)
    assert result["parameter"] == parameter
    expected, _ = eager_training(initial)
    assert result["losses"] == pytest.approx(expected, rel=0.05)  # bf16 keeps ~3 significant digits


def mismatched(fabric: Any) -> None:
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(4))
    else:
        fabric.all_gather(torch.ones(3))


def test_debug_reports_a_mismatched_collective() -> None:
    started = time.monotonic()
    with pytest.raises(CollectiveMismatchError) as error:
        launch(mismatched, strategy="xla", devices=2, debug=True)
    message = str(error.value)
    assert "rank 0: #1 all_reduce(float32[4]) reduce_op=sum" in message, message
    assert "rank 1: #1 all_gather(float32[3])" in message, message
    assert "in mismatched: fabric.all_reduce(torch.ones(4))" in message, message
    assert "in mismatched: fabric.all_gather(torch.ones(3))" in message, message
    assert time.monotonic() - started < 60


def one_rank_ends_early(fabric: Any) -> None:
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(2))


def test_debug_names_a_rank_that_ended_before_the_collective() -> None:
    with pytest.raises(CollectiveMismatchError, match=r"#1 all_reduce\(float32\[2\]\).*rank 1 ended before reaching"):
        launch(one_rank_ends_early, strategy="xla", devices=2, debug=True)


def matched_with_debug(fabric: Any) -> float:
    total = fabric.all_reduce(torch.tensor([float(fabric.global_rank)]), reduce_op="sum")
    fabric.barrier()
    return float(total)


def test_debug_lets_matching_collectives_through() -> None:
    assert launch(matched_with_debug, strategy="xla", devices=2, debug=True) == 1.0


def fails_on_rank_one(fabric: Any) -> None:
    if fabric.global_rank == 1:
        raise ValueError("bad batch on rank 1")
    float(fabric.all_reduce(torch.ones(2)))  # rank 0 waits in XLA for a peer that never comes


def test_an_exception_in_one_rank_reaches_the_caller_with_its_traceback() -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="bad batch on rank 1") as error:
        Fabric(strategy="xla", devices=2).launch(fails_on_rank_one)
    assert error.value.rank == 1
    assert 'raise ValueError("bad batch on rank 1")' in error.value.remote_traceback
    assert "in fails_on_rank_one" in error.value.remote_traceback
    assert "notebook_fabric/launching" not in error.value.remote_traceback  # it starts at the user's function
    assert time.monotonic() - started < 60


def rank_number_in_the_graph(fabric: Any) -> None:
    # a Python number that differs by rank is compiled into each rank's graph: the graphs differ
    float(fabric.all_reduce(torch.ones(2).to(fabric.device) * fabric.global_rank, reduce_op="sum")[0])


def test_graphs_that_differ_by_rank_end_in_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(RankDiedError, match=r"graphs differ at a collective.*tensor data.*debug=True"):
        launch(rank_number_in_the_graph, strategy="xla", devices=2)
    assert time.monotonic() - started < 60  # XLA gives up on the collective after 10 s
