"""The wheel users install holds every module of the source tree, and each imports from it.

pyproject.toml lists its packages one by one, so a new subpackage missing there would pass every
test of the editable install and be absent from the wheel. This builds the real wheel, unpacks it
and imports every module from the unpacked copy (checking each came from there, not the source).
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {"notebook_fabric": REPO / "notebook_fabric", "notebook_fabric/magics": REPO / "magics"}

IMPORT_ALL = """
import importlib, json, pkgutil, sys
root = sys.argv[1]
import notebook_fabric
names = ["notebook_fabric"] + [m.name for m in pkgutil.walk_packages(notebook_fabric.__path__, "notebook_fabric.")]
outside, failed = [], {}
for name in names:
    try:
        module = importlib.import_module(name)
    except Exception as error:
        failed[name] = f"{type(error).__name__}: {error}"
        continue
    if not (getattr(module, "__file__", "") or "").startswith(root):
        outside.append(f"{name} from {module.__file__}")
print(json.dumps({"names": names, "outside": outside, "failed": failed}))
"""


def _source_modules() -> set:
    found = set()
    for prefix, folder in SOURCE_ROOTS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder)
            if "__pycache__" in relative.parts:
                continue
            found.add(f"{prefix}/{relative.as_posix()}")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(REPO), "-w", str(out)], check=True, cwd=str(out))
    (built,) = out.glob("notebook_fabric-*.whl")
    return built


def test_the_wheel_holds_every_source_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
    missing = sorted(_source_modules() - shipped)
    assert not missing, f"modules absent from the wheel (add their package to pyproject.toml): {missing}"


def test_every_module_imports_from_the_unpacked_wheel(wheel, tmp_path):
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(unpacked)], cwd=str(tmp_path), check=True,
                          capture_output=True, text=True, env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"})
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "notebook_fabric.magics" in report["names"] and len(report["names"]) > 50
    assert report["outside"] == [], report["outside"]
    assert report["failed"] == {}, report["failed"]
