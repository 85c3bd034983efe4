"""The package's layering, read from its source by scripts/import_graph.py: no import circle across
folders; strategies/, collectives/ and live/ never import launching/; the rank side never imports fabric.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def test_no_import_circle_across_folders_and_no_forbidden_import() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 circles across folders (0 modules), 0 forbidden imports"


def test_the_script_sees_a_forbidden_import_and_a_circle(tmp_path: Path) -> None:
    """The checker is not vacuous: a copy of the script over a package that breaks both rules reports both."""
    package = tmp_path / "notebook_fabric"
    for folder in ("launching", "launching/rank", "live", "strategies"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "fabric.py").write_text("from .launching import pool\n")
    (package / "launching" / "pool.py").write_text("def start():\n    from ..fabric import Fabric\n")
    (package / "launching" / "rank" / "main.py").write_text("from ...fabric import Fabric\n")
    (package / "live" / "stall.py").write_text("from ..launching.pool import start\n")
    (tmp_path / "magics").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "import_graph.py").write_text(SCRIPT.read_text())
    result = subprocess.run([sys.executable, str(tmp_path / "scripts" / "import_graph.py")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "forbidden: notebook_fabric.live.stall imports notebook_fabric.launching.pool" in result.stdout
    assert "forbidden: notebook_fabric.launching.rank.main imports notebook_fabric.fabric" in result.stdout
    assert "notebook_fabric.fabric\n  notebook_fabric.launching.pool" in result.stdout, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("1 circles across folders")
