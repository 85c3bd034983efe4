"""``fabric.launch(fn)`` in a script (``python script.py``) runs ``fn`` on the ranks and nothing else,
for every strategy whose ``fabric.launch()`` re-runs the script (ddp, fsdp, deepspeed,
model_parallel): the work before ``launch`` runs once, ``fn``'s value returns to the script, and
``fn`` may live in a ``__main__`` without a main guard.
"""
from __future__ import annotations

import pytest

from conftest import SCRIPTS
from notebook_fabric.strategies.deepspeed import deepspeed_available

pytestmark = pytest.mark.timeout(300)

STRATEGIES = [
    "ddp", "fsdp", "model_parallel",
    "ddp_spawn",  # spawned ranks: fn travels by value, the script (no main guard) is never imported again
    pytest.param("deepspeed", marks=pytest.mark.skipif(not deepspeed_available(), reason="deepspeed is not installed")),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_launch_fn_in_a_script_runs_only_fn_on_the_ranks(run_script, strategy):
    result = run_script(SCRIPTS / "launch_fn_in_script.py", strategy, timeout=240)
    assert result.returncode == 0, result.describe()
    record = result.check("launched")[0]
    assert record["module_runs"] == [str(record["parent_pid"])], "the script's module-level code ran more than once"
    value = record["result"]
    assert value["rank"] == 0 and value["world_size"] == 2
    assert value["total"] == 1 + 2 + 100  # a real all_reduce over both ranks, plus fn's argument
    assert value["pid"] != record["parent_pid"]  # fn ran in a rank, not in the script's process
    assert (result.cwd / "module_runs.txt").read_text().split() == [str(record["parent_pid"])]
