"""XLA from a real Jupyter kernel: a failing rank's traceback reaches the cell, and ``%%fabric
--strategy xla`` is refused before any rank starts."""
from __future__ import annotations

import pytest

pytest.importorskip("torch_xla", reason="needs torch_xla: run scripts/xla_env.sh (its own venv, torch 2.9.0)")

from xla_fixtures import no_process_left  # noqa: E402,F401 (autouse: no rank process is left)

from support.kernels import magics_kernel, plain  # noqa: E402


def test_xla_from_a_kernel() -> None:
    with magics_kernel() as kernel:
        kernel.ok("import os, torch\nos.environ['PJRT_DEVICE'] = 'CPU'\nfrom notebook_fabric import launch")
        kernel.ok("def train(fabric):\n    if fabric.global_rank == 1:\n        raise KeyError('no such column on rank 1')\n"
                  "    return fabric.global_rank")  # fmt: skip
        reply = kernel.run("launch(train, strategy='xla', devices=2)", timeout=120)
        text = plain(reply.error_text)
        assert "KeyError" in text and "no such column on rank 1" in text, text
        assert "Traceback on rank 1" in text and "line 3, in train" in text, text  # the rank's own traceback
        refused = kernel.run("%%fabric --strategy xla --devices 2\nfabric.global_rank", timeout=60)
        message = plain(refused.all_text)
        assert "--strategy xla: %%fabric runs cells on a pool" in message, message
        assert "launch(train, strategy='xla'" in message, message
        assert not kernel.ranks(), "a rank process was started"
