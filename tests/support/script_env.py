"""The environment a test's script or launched job runs in (a module of its own, not conftest: spawned
ranks import test modules, and on their path ``conftest`` may name another folder's conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: every process of a test's run carries this variable (its value unique to the run): leak checks find them
MARKER = "NF_CORE_TEST_RUN"
INHERITED_PREFIXES = ("NOTEBOOK_FABRIC_", "TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "MV2_")
INHERITED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "NODE_RANK")  # fmt: skip


def script_environment(marker: str) -> dict[str, str]:
    """This environment minus rank/scheduler variables, with the repository importable and one thread per rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_PREFIXES) and k not in INHERITED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env[MARKER] = marker
    return env
