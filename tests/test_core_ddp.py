"""The Fabric core on 2 real CPU ranks (gloo): scripts under tests/scripts/ use
``Fabric(accelerator="cpu", devices=2, strategy="ddp")`` + ``fabric.launch()`` (the script re-runs
itself for rank 1) and print rank-tagged JSON lines that these tests check.

Each job start costs seconds (torch import, DDP's first construction), so one script runs many
checks, and independent scripts run two at a time.
"""
from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPTS, ScriptResult, clean_rank_environment, start_script
from notebook_fabric import Fabric

sys.path.insert(0, str(SCRIPTS))
from core_common import digest, make_model, state_digest  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_environment")


def ok(result: ScriptResult) -> ScriptResult:
    assert result.returncode == 0, result.describe()
    return result


def both(result: ScriptResult, check: str) -> tuple[dict, dict]:
    records = result.check(check)
    assert sorted(records) == [0, 1], f"{check}: ranks {sorted(records)}\n{result.describe()}"
    return records[0], records[1]


# ----- jobs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def basics(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScriptResult, dict, ScriptResult]:
    """core_ddp_basics.py (with checkpoints written here on 1 process), alongside examples/quickstart.py."""
    folder = tmp_path_factory.mktemp("ddp_basics")
    with clean_rank_environment():
        fabric = Fabric(accelerator="cpu", devices=1)
        torch.manual_seed(7)
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        model, optimizer = fabric.setup(model, optimizer)
        fabric.backward(model(torch.randn(3, 4)).sum())
        optimizer.step()
        fabric.save(folder / "one.ckpt", {"model": model, "optimizer": optimizer, "epoch": 7, "extra": "hello"})
        raw = make_model()
        torch.save(raw.state_dict(), folder / "raw.pt")
        expected = {
            "params": state_digest(model),
            "buffers": digest(optimizer.state[p]["momentum_buffer"] for p in model.parameters()),
            "raw": state_digest(raw),
        }
    quickstart_folder = tmp_path_factory.mktemp("quickstart")
    jobs = [
        start_script(SCRIPTS / "core_ddp_basics.py", "--out", folder, "--load-from", folder / "one.ckpt", "--raw",
                     folder / "raw.pt", cwd=folder, timeout=240),
        start_script(REPO / "examples" / "quickstart.py", cwd=quickstart_folder, timeout=240),
    ]  # fmt: skip
    basics_result, quickstart_result = (job.wait() for job in jobs)
    return ok(basics_result), expected, quickstart_result


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScriptResult]:
    """spec/002's migration loop and its gradient-accumulation loop, run side by side."""
    jobs = {
        name: start_script(SCRIPTS / f"core_{name}.py", cwd=tmp_path_factory.mktemp(name), timeout=240)
        for name in ("migration", "grad_accum")
    }
    return {name: job.wait() for name, job in jobs.items()}


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ScriptResult]:
    """core_fail.py with rank 0 failing and with rank 1 failing, side by side.

    The 60 s limit is far below the 30 min collective timeout the surviving rank would otherwise wait."""
    jobs = {
        rank: start_script(SCRIPTS / "core_fail.py", rank, cwd=tmp_path_factory.mktemp(f"fail{rank}"), timeout=60)
        for rank in (0, 1)
    }
    return {rank: job.wait() for rank, job in jobs.items()}


# ----- launch, ranks, properties -----------------------------------------------------------------
def test_launch_starts_rank_one_by_rerunning_the_script(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "properties")
    for rank, record in ((0, zero), (1, one)):
        assert record["global_rank"] == record["local_rank"] == record["dist_rank"] == rank
        assert record["is_global_zero"] is (rank == 0)
        assert record["node_rank"] == 0
        assert record["world_size"] == record["dist_world_size"] == 2
        assert record["device"] == "cpu"
        assert record["strategy"] == "DDPStrategy" and record["start_method"] == "popen"
        assert record["initialized"] and record["backend"] == "gloo"
        assert record["logger"] == "CSVLogger" and record["num_loggers"] == 1
    assert one["ppid"] == zero["pid"], "rank 1 should be a child of the script run as rank 0"
    both(result, "done")


def test_the_seed_reaches_every_rank(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "seed")
    assert zero["seed"] == one["seed"] and zero["draw"] == one["draw"]


def test_setup_makes_parameters_bit_identical_and_keeps_them_so(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "setup")
    assert zero["initial"] != one["initial"], "the ranks should start from different weights"
    assert zero["after_setup"] == one["after_setup"] == zero["initial"], "setup() should broadcast rank 0's weights"
    assert zero["after_steps"] == one["after_steps"] != zero["after_setup"]
    for record in (zero, one):
        assert record["is_ddp"] and record["sgd"]
        assert record["state_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no "module." prefix
        assert record["tag"] == "mine" and record["module_is_plain"] == "Sequential"
    zero, one = both(result, "setup_module")
    assert zero["params"] == one["params"]
    assert zero["adam"] and one["adam"] and zero["is_ddp"] and one["is_ddp"]


def test_each_rank_reads_its_own_shard_and_the_order_changes_each_epoch(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "data")
    for epoch in range(2):
        mine, theirs = zero["epochs"][epoch], one["epochs"][epoch]
        assert len(mine) == len(theirs) == 10
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == list(range(20))
    assert zero["epochs"][0] != zero["epochs"][1] and one["epochs"][0] != one["epochs"][1]
    for record in (zero, one):
        assert record["sampler"] == "DistributedSampler" and record["distributed"]
        assert record["num_batches"] == 4  # ceil(10 / 3)
        assert record["unsharded"] == list(range(20)) and record["unsharded_sampler"] == "SequentialSampler"
    assert zero["ordered_a"] == zero["ordered_b"] == list(range(0, 20, 2))
    assert one["ordered_a"] == one["ordered_b"] == list(range(1, 20, 2))


# ----- collectives ---------------------------------------------------------------------------------
def test_all_reduce_by_value_without_touching_the_input(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "all_reduce")
    assert zero["spec_logging"] == {"loss": 2.0, "sync_loss": 3.0, "grad": [[1.0, 1.0]]}
    assert one["spec_logging"] == {"loss": 4.0, "sync_loss": 3.0, "grad": [[2.0, 2.0]]}
    for record in (zero, one):
        assert record["reduced"] == {"sum": [3.0, 30.0], "mean": [1.5, 15.0], "max": [2.0, 20.0], "min": [1.0, 10.0]}
        assert record["unchanged"] and not record["same_object"]
        assert record["default_mean"] == 0.5
        assert record["int_mean"] == 1.5
        assert record["list_max"] == [[1, 0], 2.5]
        assert record["collection"] == {"a": 1.0, "b": [[1, 2], 3.0], "c_is_tuple": True, "c": 3}
        assert "median" in record["bad_op"] and all(op in record["bad_op"] for op in ("sum", "mean", "max", "min"))


def test_all_gather_stacks_on_a_new_first_dimension(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "all_gather")
    for record in (zero, one):
        assert record["gathered"] == [[0, 10], [1, 11]]
        assert record["scalars"] == [0.0, 1.0]
        assert record["matrix_shape"] == [2, 3, 2] and record["own_row"]
        assert record["nested_x_shape"] == [2, 2, 2]
        assert record["nested_x"] == [[[0, 0], [0, 0]], [[1, 1], [1, 1]]]
        assert record["nested_y"] == [[0.0, 1.0], [0.5, 1.5]]
        assert record["sync_grads_value"] == [1.0, 2.0] and record["requires_grad"]
        assert record["no_sync_requires_grad"] is False
    # every rank's loss is 1 * gathered[0] + 2 * gathered[1]: the gradients of both ranks' losses are summed
    assert zero["leaf_grad"] == [2.0] and one["leaf_grad"] == [4.0]


def test_broadcast_tensors_and_objects(basics) -> None:
    result, _, _ = basics
    for record in both(result, "broadcast"):
        assert record["tensor"] == [5.0] and record["tensor_src1"] == [15.0]
        assert record["config"] == {"learning_rate": 0.001, "batch_size": 32}
        assert record["from_one"] == {"from": 1, "t": [1, 1]}
        assert record["string"] == "rank1"


def test_barrier_waits_for_every_rank(basics) -> None:
    result, _, _ = basics
    for record in both(result, "barrier"):
        assert record["seen"] == "written by rank 1"


def test_rank_zero_first_runs_rank_zero_before_the_others(basics) -> None:
    result, _, _ = basics
    for record in both(result, "rank_zero_first"):
        assert record["contents"] == ["prepared by rank 0 (local=False)", "prepared by rank 0 (local=True)"]


def test_no_backward_sync_really_skips_the_gradient_sync(basics) -> None:
    result, _, _ = basics
    for record in both(result, "no_backward_sync"):
        assert record["inside"] == [2.0, 4.0]  # each rank kept its own gradient
        assert record["synced"] == [3.0, 3.0]  # averaged over the ranks
        assert record["disabled"] == [3.0, 3.0]


def test_print_and_log_happen_on_rank_zero_only(basics) -> None:
    result, _, _ = basics
    assert result.stdout.count("FABRIC-PRINT") == 1 and "FABRIC-PRINT from rank 0" in result.stdout
    zero, one = both(result, "log")
    logs = result.cwd / "logs"
    assert not (logs / str(one["pid"])).exists(), "rank 1 wrote logs"
    with open(logs / str(zero["pid"]) / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"step": "0", "loss": "0.25", "acc": "", "count": ""}, {"step": "1", "loss": "", "acc": "0.75", "count": "3"}]


def test_ddp_strategy_arguments_reach_ddp(basics) -> None:
    result, _, _ = basics
    for rank, record in enumerate(both(result, "ddp_kwargs")):
        assert record["find_unused_parameters"] is True and record["gradient_as_bucket_view"] is True
        assert record["backend"] == "gloo" and record["timeout"] == 7 * 60
        assert record["world_size"] == 2 and record["global_rank"] == rank


# ----- checkpoints across world sizes --------------------------------------------------------------
def test_save_on_two_ranks_load_on_one(basics) -> None:
    result, _, _ = basics
    zero, one = both(result, "saved")
    assert zero["params"] == one["params"] and zero["exists"] and one["exists"]
    fabric = Fabric(accelerator="cpu", devices=1)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    remainder = fabric.load(result.cwd / "two_ranks.ckpt", state)
    assert state_digest(model) == zero["params"]
    assert state["step"] == 3 and remainder == {"meta": {"note": "2 ranks"}}
    assert optimizer.param_groups[0]["lr"] == 0.05 and len(optimizer.state) == 4
    raw = torch.load(result.cwd / "two_ranks.ckpt", weights_only=True)
    assert sorted(raw["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_save_on_one_load_on_two(basics) -> None:
    result, expected, _ = basics
    zero, one = both(result, "loaded")
    for record in (zero, one):
        assert record["params"] == expected["params"]
        assert record["buffers"] == expected["buffers"]
        assert record["epoch"] == 7 and record["remainder"] == {"extra": "hello"}
        assert record["lr"] == record["inner_lr"] == 0.2 and record["momentum"] == 0.9
        assert record["everything_keys"] == ["epoch", "extra", "model", "optimizer"]
        assert "not_in_file" in record["strict_error"]
        assert record["lenient_value"] == 1 and record["lenient_remainder"] == ["epoch", "extra", "optimizer"]
        assert record["raw_wrapped"] == record["raw_plain"] == expected["raw"]
    assert zero["after_step"] == one["after_step"], "a step after loading diverged between the ranks"


# ----- spec/002's loops, the quickstart ------------------------------------------------------------
def epoch_losses(result: ScriptResult, epochs: int) -> list[float]:
    losses = []
    for epoch in range(epochs):
        zero, one = both(result, f"epoch{epoch}")
        assert zero["loss"] == one["loss"]  # all-reduced
        losses.append(zero["loss"])
    return losses


def test_spec_migration_loop_trains_on_two_ranks(training) -> None:
    result = ok(training["migration"])
    zero, one = both(result, "migration")
    losses = epoch_losses(result, zero["epochs"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert zero["params"] == one["params"]
    for record in (zero, one):
        assert record["world_size"] == 2
        assert record["output_dtype"] == "torch.float32" and record["param_dtype"] == "torch.float32"
        assert record["samples"] == 256 * record["epochs"]  # half of the 512 samples per epoch


def test_spec_migration_loop_in_bf16_mixed_equals_the_plain_pytorch_loop(training) -> None:
    """Issue 9, item 2: bf16-mixed casts inputs to bf16 and outputs to float32, as Lightning does, so the
    migration loop ends bit-equal to plain DDP + autocast with those casts written by hand."""
    result = ok(training["migration"])
    fabric_zero, fabric_one = both(result, "migration")
    plain_zero, plain_one = both(result, "migration_plain")
    assert fabric_zero["params"] == plain_zero["params"] == fabric_one["params"] == plain_one["params"]


def test_spec_gradient_accumulation_loop_trains_on_two_ranks(training) -> None:
    result = ok(training["grad_accum"])
    zero, one = both(result, "grad_accum")
    losses = epoch_losses(result, zero["epochs"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert zero["params"] == one["params"]
    assert zero["norms"] == one["norms"]  # clipped after the sync: the same gradients on both ranks
    for record in (zero, one):
        assert record["batches_per_epoch"] == 32
        assert record["optimizer_steps"] == record["epochs"] * 32 // 4
        assert len(record["norms"]) == record["optimizer_steps"]
        assert all(math.isfinite(norm) and norm > 0 for norm in record["norms"])


def test_quickstart_runs_on_two_ranks(basics) -> None:
    _, _, result = basics
    assert result.returncode == 0, result.describe()
    losses = [float(value) for value in re.findall(r"^epoch \d+: loss ([\d.]+) on 2 ranks$", result.stdout, re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0], result.stdout
    assert (result.cwd / "quickstart.ckpt").is_file()
    # the progress the README promises: each epoch's bar ends counting all 16 batches, with the loss
    # (drawn once more on close when tqdm's own refresh already drew the last batch)
    finished_bars = re.findall(r"epoch (\d): 100%\|[^|]*\| 16/16 \[[^\]]*loss=[\d.]+\]", result.stderr)
    assert list(dict.fromkeys(finished_bars)) == ["0", "1", "2"], result.stderr


# ----- failures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_exception_on_one_rank_ends_the_job(failures, failing_rank: int) -> None:
    result = failures[failing_rank]  # no process of the job survived it (checked when it was collected)
    assert result.returncode != 0, result.describe()
    both(result, "ready")
    assert f"RuntimeError: boom on rank {failing_rank}" in result.stderr
    assert not [r for r in result.records if r["check"] == "unreachable"]
