"""The magic's notebook-side pieces that need no kernel: cell analysis, shipping rules, rendering."""
from __future__ import annotations

import threading

import pytest
import torch

from notebook_fabric.magics.analysis import IPythonSyntaxError, analyze_cell
from notebook_fabric.magics.render import clean_traceback, format_values
from notebook_fabric.magics.settings import PoolSettings, parse_ranks
from notebook_fabric.magics.shipping import UnpicklableVariableError, ValueTracker


@pytest.mark.parametrize("source, reads, binds, display", [
    ("x = x + 1", {"x"}, {"x"}, False),
    ("model = make(); print(model)", {"make", "print"}, {"model"}, True),
    ("def f(a, b=c):\n    return a + b + d\nf(1)", {"c", "d"}, {"f"}, True),
    ("[i * k for i in range(n)]", {"k", "n", "range"}, set(), True),
    ("import torch.nn as nn\nnn.Linear", set(), {"nn"}, True),
    ("for i in range(3):\n    total += i\ntotal", {"range", "total"}, {"i", "total"}, True),
    ("class A(Base):\n    y = 1\n    def m(self):\n        return self.y + z", {"Base", "z"}, {"A"}, False),
    ("try:\n    pass\nexcept E as e:\n    print(e)", {"E", "print"}, {"e"}, False),
    ("with open(p) as fh:\n    data = fh.read()", {"open", "p"}, {"fh", "data"}, False),
    ("x;  # hidden", {"x"}, set(), False),
    ("x  # shown", {"x"}, set(), True),
    ("lambda q: q + w", {"w"}, set(), True),
])
def test_cell_analysis(source: str, reads: set, binds: set, display: bool) -> None:
    analysis = analyze_cell(source)
    assert set(analysis.reads) == reads
    assert set(analysis.binds) == binds
    assert analysis.display is display


def test_ipython_syntax_and_line_numbers_of_syntax_errors() -> None:
    with pytest.raises(IPythonSyntaxError, match="line 3 of the %%fabric cell is IPython syntax"):
        analyze_cell("x = 1\n!ls", line_offset=1)
    with pytest.raises(SyntaxError) as info:
        analyze_cell("x = 1\ny = (", "<fabric-cell-4>", line_offset=1)
    assert info.value.filename == "<fabric-cell-4>" and info.value.lineno == 3


def test_values_ship_once_and_again_when_they_change() -> None:
    tracker = ValueTracker()
    t = torch.zeros(2)
    ns = {"lr": 0.1, "cfg": {"a": 1}, "t": t, "torch": torch, "fabric": "never", "_": 1, "_3": 2}
    first = tracker.collect(["lr", "cfg", "t", "torch", "fabric", "_", "_3", "absent"], ns)
    assert set(first.values) == {"lr", "cfg", "t", "torch"}
    tracker.commit(first)
    assert not tracker.collect(["lr", "cfg", "t", "torch"], ns).values  # nothing changed: nothing travels
    ns["cfg"]["a"] = 2  # in place
    t.add_(1)  # in place: the tensor's version counter moves
    ns["lr"] = 0.2
    assert set(tracker.collect(["lr", "cfg", "t", "torch"], ns).values) == {"lr", "cfg", "t"}


def test_rank_bound_names_win_until_the_notebook_assigns_again() -> None:
    tracker = ValueTracker()
    ns = {"scale": 3}
    tracker.commit(tracker.collect(["scale"], ns))
    tracker.mark_rank_bound(["scale", "only_on_ranks"], ns)  # a cell assigned both on the ranks
    assert not tracker.collect(["scale"], ns).values
    ns["scale"] = 4
    ns["only_on_ranks"] = "new in the notebook"
    assert set(tracker.collect(["scale", "only_on_ranks"], ns).values) == {"scale", "only_on_ranks"}


def test_notebook_functions_travel_without_globals_and_bring_what_they_read() -> None:
    ns: dict = {"__name__": "__main__", "factor": 3}
    exec("def scaled(x):\n    return x * factor * fabric.world_size\n", ns)
    shipment = ValueTracker().collect(["scaled"], ns)
    assert set(shipment.values) == {"scaled", "factor"} and shipment.rebind == ("scaled",)


def test_unpicklable_value_is_named() -> None:
    with pytest.raises(UnpicklableVariableError, match=r"'lock' \(a _thread.lock\)"):
        ValueTracker().collect(["lock"], {"lock": threading.Lock()})


def test_rank_lists_and_settings() -> None:
    assert parse_ranks(None, 4) is None and parse_ranks("all", 4) is None
    assert parse_ranks("0,2", 4) == [0, 2] and parse_ranks("1-2", 4) == [1, 2]
    assert parse_ranks("0-3", 4) is None  # every rank: not a subset
    with pytest.raises(ValueError, match="not in this pool of 2 ranks"):
        parse_ranks("5", 2)
    base = PoolSettings()
    assert base.merged({"devices": None, "precision": None}) == base  # options left out keep the pool's
    changed = base.merged({"devices": 3, "debug": True})
    assert changed.changes_from(base) == ["devices 2 -> 3", "debug False -> True"]


def test_rendering() -> None:
    assert format_values({0: "1", 1: "1"}) == "[ranks 0-1] 1"
    assert format_values({0: "a", 1: "b\nc"}) == "[rank 0] a\n[rank 1]\nb\nc"
    import notebook_fabric.magics.cell_task as cell_task

    text = ("Traceback (most recent call last):\n"
            f'  File "{cell_task.__file__}", line 74, in __call__\n'
            "    exec(body, namespace)\n"
            '  File "<fabric-cell-3>", line 2, in <module>\n'
            "    1 / 0\n"
            "ZeroDivisionError: division by zero")
    assert clean_traceback(text) == ('Traceback (most recent call last):\n  File "<fabric-cell-3>", line 2, in <module>\n'
                                     "    1 / 0\nZeroDivisionError: division by zero")


def test_the_fabric_line_commands_come_from_one_table() -> None:
    """``%fabric`` sub-commands: the usage text, the parsers and the dispatch are read from ``LINE_COMMANDS``."""
    import argparse

    magics = pytest.importorskip("notebook_fabric.magics.ipython_magics")
    from notebook_fabric.magics.session import FabricSession

    names = [command.name for command in magics.LINE_COMMANDS]
    assert names == ["status", "where", "ledger", "stop", "restart", "pull", "push", "debug"]
    assert all(command.synopsis in magics.LINE_USAGE for command in magics.LINE_COMMANDS)
    pull = magics._parse(["loss", "--all"], "pull", magics._BY_NAME["pull"].arguments)
    assert pull.name == "loss" and pull.all and pull.rank is None
    session = FabricSession({})
    assert magics._BY_NAME["status"].run(session, argparse.Namespace()).startswith("no pool is running")
