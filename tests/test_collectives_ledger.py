"""The ledger as a rank records it: one record per Fabric collective, torch's numbering, the user's line.

Real ranks started by ``launch`` (fork), real gloo collectives. The heartbeat, stall reports and
``where`` read the rank's current collective from the same record (``test_live_stall.py``,
``test_collectives_hangs.py``); here is what the record holds, and that without the dashboard it
is the only link of the chain.
"""
from __future__ import annotations

import inspect

import torch

from support.processes import wait_no_children
from notebook_fabric import launch


def _three_collectives(fabric):
    from notebook_fabric.collectives.ledger import LedgerTracer, process_ledger
    from notebook_fabric.collectives.trace import get_tracer

    chain = get_tracer()
    ledger = process_ledger()
    first = len(ledger.calls)
    total = fabric.all_reduce(torch.ones(3), reduce_op="sum")
    fabric.barrier("middle")
    gathered = fabric.all_gather(torch.tensor([fabric.global_rank]))
    rows = [(c.seq, c.op, c.place[0], c.place[1], c.place[2], bool(c.ended_ns), c.error)
            for c in list(ledger.calls)[first:]]
    return {"chain": type(chain).__name__, "inner": chain.inner, "open": ledger.open_call(),
            "rows": rows, "total": total.tolist(), "gathered": gathered.view(-1).tolist(),
            "is_ledger": isinstance(chain, LedgerTracer)}


def test_each_fabric_collective_is_recorded_once_with_torchs_numbering_and_the_users_line() -> None:
    results = launch(_three_collectives, devices=2, accelerator="cpu", return_all=True)
    source, start = inspect.getsourcelines(_three_collectives)
    line_of = {text.strip().split(" = ")[-1].split("(")[0]: start + i for i, text in enumerate(source)}
    for rank, result in enumerate(results):
        assert result["total"] == [2.0, 2.0, 2.0] and result["gathered"] == [0, 1]
        # without the dashboard the ledger is the whole chain: nothing else records the call again
        assert result["is_ledger"] and result["chain"] == "LedgerTracer" and result["inner"] is None
        assert result["open"] is None  # every call returned
        rows = result["rows"]
        assert [r[1] for r in rows] == ["all_reduce", "barrier", "all_gather"], rows
        seqs = [r[0] for r in rows]
        assert seqs == list(range(seqs[0], seqs[0] + 3)), f"rank {rank}: one torch collective each, numbered in turn"
        assert all(r[2] == __file__ and r[4] == "_three_collectives" for r in rows), rows  # the user's frame
        assert [r[3] for r in rows] == [line_of["fabric.all_reduce"], line_of["fabric.barrier"],
                                        line_of["fabric.all_gather"]], rows
        assert all(r[5] and r[6] is None for r in rows)  # finished, no error
    assert results[0]["rows"][0][0] == results[1]["rows"][0][0]  # both ranks number the same call alike
    assert wait_no_children(15.0) == []
