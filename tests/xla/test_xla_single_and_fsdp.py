"""``single_xla`` against eager CPU training, and ``xla_fsdp`` on 1 and 2 XLA:CPU devices with full and
sharded checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest

pytest.importorskip("torch_xla", reason="needs torch_xla: run scripts/xla_env.sh (its own venv, torch 2.9.0)")

from xla_fixtures import no_process_left  # noqa: E402,F401 (autouse: no rank process is left)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from notebook_fabric import launch  # noqa: E402
from xla_models import LR, STEPS, build_model, eager_training, fabric_training_losses, initial_state, shard  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_single_xla_trains_like_eager_cpu(tmp_path: Path) -> None:
    """One XLA device in the process itself (so in a fresh interpreter: this one must never start the
    XLA runtime, or torch_xla's launcher refuses the other tests)."""
    code = textwrap.dedent(
        """
        import json, torch
        from torch import nn
        from notebook_fabric import Fabric
        from xla_models import LR, STEPS, build_model, eager_training, initial_state, full_batch
        initial = initial_state()
        fabric = Fabric(devices=1, strategy="single_xla")
        fabric.launch()
        model = build_model()
        model.load_state_dict(initial)
        model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=LR))
        x, y = (t.to(fabric.device) for t in full_batch())
        losses = []
        for _ in range(STEPS):
            loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            fabric.strategy.mark_step()
            losses.append(float(loss))
        fabric.save("ckpt.pt", {"model": model, "step": STEPS})
        expected, state = eager_training(initial)
        saved = torch.load("ckpt.pt", weights_only=False)
        print(json.dumps({"device": fabric.device.type, "losses": losses, "expected": expected, "step": saved["step"],
                          "max_diff": max(float((saved["model"][k] - v).abs().max()) for k, v in state.items())}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["device"] == "xla" and out["step"] == STEPS
    assert out["losses"] == pytest.approx(out["expected"], abs=1e-5)
    assert out["expected"][-1] < 0.8 * out["expected"][0]
    assert out["max_diff"] < 1e-5


def fsdp_training(fabric: Any, initial: Dict[str, torch.Tensor], folder: str) -> Dict[str, Any]:
    model = build_model()
    model.load_state_dict(initial)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=LR))
    losses = fabric_training_losses(fabric, model, optimizer)
    fabric.save(folder, {"model": model, "optimizer": optimizer, "step": STEPS})
    restored = fabric.setup_module(build_model())
    restored_optimizer = fabric.setup_optimizers(torch.optim.SGD(restored.parameters(), lr=LR))
    rest = fabric.load(folder, {"model": restored, "optimizer": restored_optimizer})
    x, y = (t.to(fabric.device) for t in shard(fabric.global_rank, fabric.world_size))
    with torch.no_grad():
        trained = float(fabric.all_reduce(nn.functional.mse_loss(model(x), y)))
        loaded = float(fabric.all_reduce(nn.functional.mse_loss(restored(x), y)))
    return {"losses": losses, "trained": trained, "loaded": loaded, "rest": rest, "world_size": fabric.world_size}


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_xla_fsdp_trains_and_checkpoints(tmp_path: Path, devices: int, state_dict_type: str) -> None:
    from notebook_fabric.strategies.xla_fsdp import XLAFSDPStrategy

    initial = initial_state()
    folder = tmp_path / "ckpt"
    result = launch(fsdp_training, initial, str(folder), strategy=XLAFSDPStrategy(state_dict_type=state_dict_type),
                    devices=devices)  # fmt: skip
    expected_losses, expected_state = eager_training(initial)
    assert result["world_size"] == devices
    assert result["losses"] == pytest.approx(expected_losses, abs=1e-5)
    assert result["loaded"] == pytest.approx(result["trained"], abs=1e-6)  # the shards came back
    assert result["rest"] == {"step": STEPS}
    shards = sorted(p.name for p in folder.iterdir())
    assert [n for n in shards if n.startswith("rank-")] == [f"rank-{r:05d}-of-{devices:05d}.pth" for r in range(devices)]
    if state_dict_type == "full":
        full = torch.load(folder / "full.pth", weights_only=False)["model"]
        for name, value in expected_state.items():
            torch.testing.assert_close(full[name], value, atol=1e-5, rtol=1e-5)
    else:
        assert "full.pth" not in shards
