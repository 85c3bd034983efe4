"""Run Lightning's own Fabric tests, parity scripts and examples against notebook_fabric.

Outside the project's test suite: Lightning is not a dependency. Whoever has a checkout of
Lightning-AI/pytorch-lightning (v2.6.x) runs, from this project's venv::

    python scripts/lightning_suite.py --lightning ~/pytorch-lightning tests [-- PYTEST ARGS]
    python scripts/lightning_suite.py --lightning ~/pytorch-lightning parity   # test_parity_ddp on 2 CPU ranks
    python scripts/lightning_suite.py --lightning ~/pytorch-lightning example reinforcement_learning/train_fabric.py [ARGS]

``tests`` copies ``tests/tests_fabric`` and ``tests/parity_fabric`` into a temporary folder and runs
pytest there with ``scripts/lightning_shim`` first on the path: a package named ``lightning`` whose
``fabric`` is notebook_fabric. Lightning's test helpers need ``lightning-utilities``, ``tensorboardX``
and ``jsonargparse``; they are installed with ``pip --target`` into ``--deps`` (a folder of their
own, default ``~/.cache/notebook-fabric/lightning-suite``), never into the venv. The summary lists
the failing tests (``--report FILE`` writes them as JSON); compare with docs/lightning-differences.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
SHIM = HERE / "lightning_shim"
TEST_DEPENDENCIES = ["lightning-utilities==0.15.3", "tensorboardX==2.6.5", "jsonargparse==4.53.0"]
DEFAULT_DEPS = Path.home() / ".cache" / "notebook-fabric" / "lightning-suite"


def ensure_dependencies(deps: Path) -> None:
    """Lightning's test helpers, in a folder of their own (``pip --target``, no dependencies pulled)."""
    if (deps / "lightning_utilities").is_dir() and (deps / "jsonargparse").is_dir():
        return
    deps.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps),
                    *TEST_DEPENDENCIES], check=True)


def environment(deps: Path, *extra: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(map(str, [SHIM, deps, *extra, env.get("PYTHONPATH", "")])).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def copy_tests(lightning: Path, into: Path) -> Path:
    tests = into / "tests"
    for name in ("tests_fabric", "parity_fabric"):
        shutil.copytree(lightning / "tests" / name, tests / name)
    return tests


def run_tests(lightning: Path, deps: Path, pytest_args: List[str], report: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="lightning-suite-") as folder:
        tests = copy_tests(lightning, Path(folder))
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests),
                   f"--junitxml={junit}", "-o", "junit_family=xunit1", "--timeout=300",
                   *(pytest_args or ["tests_fabric", "parity_fabric"])]
        code = subprocess.run(command, cwd=tests, env=environment(deps, tests)).returncode
        if junit.exists():
            summarize(junit, report)
        return code


def summarize(junit: Path, report: Path | None) -> None:
    """Counts, then every failing test with the first line of its message."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failing: Dict[str, str] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = "failed" if outcome.tag == "failure" else outcome.tag
        counts[kind] += 1
        if kind != "skipped":
            failing[name] = (outcome.get("message") or "").splitlines()[0][:200] if outcome.get("message") else ""
    print("\nlightning_suite: " + ", ".join(f"{value} {key}" for key, value in counts.items()))
    for name, message in sorted(failing.items()):
        print(f"  FAIL {name}: {message}")
    if report is not None:
        report.write_text(json.dumps({"counts": counts, "failing": failing}, indent=1, sort_keys=True))


def run_parity(lightning: Path, deps: Path, devices: int, tolerance: float) -> int:
    """``test_parity_ddp`` as Lightning's CI runs it (``parity_fabric/run_standalone_tasks.sh``): from
    ``tests/parity_fabric``, ``python -m test_parity_ddp --accelerator=cpu --devices=2 --tolerance=T``."""
    with tempfile.TemporaryDirectory(prefix="lightning-parity-") as folder:
        tests = copy_tests(lightning, Path(folder))
        parity = tests / "parity_fabric"
        command = [sys.executable, "-m", "test_parity_ddp", "--accelerator=cpu", f"--devices={devices}",
                   f"--tolerance={tolerance}"]
        code = subprocess.run(command, cwd=parity, env=environment(deps, parity, tests)).returncode
        print(f"lightning_suite: test_parity_ddp exited with code {code}")
        return code


def run_example(lightning: Path, deps: Path, example: str, arguments: List[str], devices: int) -> int:
    """``notebook-fabric run --accelerator cpu --strategy ddp --devices N`` on one of ``examples/fabric``."""
    script = lightning / "examples" / "fabric" / example
    with tempfile.TemporaryDirectory(prefix="lightning-example-") as folder:
        command = [sys.executable, "-m", "notebook_fabric", "run", "--accelerator", "cpu", "--strategy", "ddp",
                   "--devices", str(devices), str(script), *arguments]
        return subprocess.run(command, cwd=folder, env=environment(deps, script.parent)).returncode


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightning", type=Path, required=True, help="a checkout of Lightning-AI/pytorch-lightning")
    parser.add_argument("--deps", type=Path, default=DEFAULT_DEPS, help="where Lightning's test helpers are installed")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.02, help="parity: the timing tolerance (CI: 0.01-0.02)")
    parser.add_argument("--report", type=Path, help="write the counts and failing tests as JSON")
    parser.add_argument("what", choices=["tests", "parity", "example"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="pytest arguments, or the example and its arguments")
    options = parser.parse_args(argv)
    lightning = options.lightning.expanduser().resolve()
    if not (lightning / "tests" / "tests_fabric").is_dir():
        parser.error(f"{lightning} is not a checkout of pytorch-lightning (no tests/tests_fabric)")
    ensure_dependencies(options.deps)
    rest = [arg for arg in options.rest if arg != "--"]
    if options.what == "tests":
        return run_tests(lightning, options.deps, rest, options.report)
    if options.what == "parity":
        return run_parity(lightning, options.deps, options.devices, options.tolerance)
    if not rest:
        parser.error("example needs a path under examples/fabric, e.g. reinforcement_learning/train_fabric.py")
    return run_example(lightning, options.deps, rest[0], rest[1:], options.devices)


if __name__ == "__main__":
    sys.exit(main())
